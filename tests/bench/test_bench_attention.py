"""bench/bench_attention.py runs (small shapes) and reports, per case, fewer attention ops than the
per-sequence loop for the engine's paths. Times are not checked."""
import json

from fusedrl.bench import bench_attention


def test_report(tmp_path):
    out = tmp_path / "attention.json"
    bench_attention.main(["--quick", "--budget", "0", "--json", str(out)])
    payload = json.loads(out.read_text())
    assert "git_commit" in payload["meta"]
    rows = {(r["case"].split(":")[0], r["impl"]): r for r in payload["results"]}
    assert set(rows) == {(case, impl) for case in ("train fwd+bwd", "prefill")
                         for impl in ("loop", "padded groups", "engine")}
    assert rows["train fwd+bwd", "loop"]["attention_ops"] == 2 * 8  # forward and backward per sequence
    assert rows["prefill", "loop"]["attention_ops"] == 8
    for case in ("train fwd+bwd", "prefill"):
        assert rows[case, "engine"]["attention_ops"] <= 6 and all(r["ms"] > 0 for r in rows.values())
