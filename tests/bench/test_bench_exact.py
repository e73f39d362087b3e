"""bench/bench_exact.py runs both modes over one model on the CPU and reports the sampler vs trainer
gap: exactly 0 tokens differing in the exact mode. Times are not checked."""
import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench", "bench_exact.py")


def test_quick_run_reports_both_modes_and_no_gap_in_the_exact_one(tmp_path):
    out = tmp_path / "exact.json"
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads(out.read_text())
    assert payload["meta"]["git_commit"] and payload["meta"]["device"]
    assert [row["batch"] for row in payload["rows"]] == [1, 4]
    for row in payload["rows"]:
        assert row["default_decode_tok_s"] > 0 and row["exact_decode_tok_s"] > 0 and row["decode_ratio"] > 0
        assert row["exact_tokens"] == row["default_tokens"] == row["batch"] * payload["new_tokens"]
        assert row["exact_mismatch_max"] == 0 and row["exact_mismatch_tokens"] == 0
