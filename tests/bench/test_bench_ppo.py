"""bench/bench_ppo.py runs one PPO iteration per side on a tiny model and reports the same work
for both (TRL's side when trl is installed, as the test extra does). Times are not checked."""
import importlib.util
import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench", "bench_ppo.py")


def test_quick_run_reports_both_sides(tmp_path):
    sides = ["ours"] + (["trl"] if importlib.util.find_spec("trl") else [])
    out = tmp_path / "ppo.json"
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--sides", *sides, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads(out.read_text())
    assert payload["meta"]["git_commit"] and payload["meta"]["device"]
    shape = payload["shape"]
    for side in sides:
        result = payload["results"][side]
        assert "error" not in result, result
        assert result["iteration_s"] > 0 and result["time_generate"] > 0
        # The phases are timed inside the measured iteration (the second), so they fit in it.
        phases = sum(v for k, v in result.items() if k.startswith("time_"))
        assert phases <= result["iteration_s"]
        # Fixed-length rollouts: both sides did the same work.
        assert result["response_tokens"] == shape["prompts"] * shape["samples"] * shape["new_tokens"]
    if "trl" in sides:
        assert payload["speedup_vs_trl"] > 0
