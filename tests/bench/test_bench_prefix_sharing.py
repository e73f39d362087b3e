"""bench/bench_prefix_sharing.py counts (on the CPU, from the engine's layout) fewer forwarded
tokens and FLOPs with prefix sharing, by the factor the group's shape gives; its FLOP model's GEMMs
equal what torch's FlopCounterMode counts on a tiny model."""
import json

from fusedrl.bench import bench_prefix_sharing


def test_report(tmp_path):
    out = tmp_path / "prefix_sharing.json"
    bench_prefix_sharing.main(["--quick", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert "git_commit" in payload["meta"] and len(payload["results"]) == 4
    for r in payload["results"]:
        n, prompt, answer = r["group"], r["prompt"], r["answer"]
        # A group reads its prompt once instead of n times: n (P + A) / (P + n A) fewer tokens.
        assert r["token_ratio"] == n * (prompt + answer) / (prompt + n * answer)
        assert 1 < r["flop_ratio"] and r["tflops_shared"] < r["tflops_whole"]
    for counted in payload["verify"].values():
        assert counted["counted_flops"] == counted["modeled_flops"] > 0
