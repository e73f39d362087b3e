"""`fusedrl bench train` under torchrun: two gloo ranks on the CPU each run the case (the timed
loop's repetition count agreed across them, the gradients all-reduced), rank 0 alone writes the
record, whose rows give tokens/s per GPU and over all of them with the world size (the refusal
of the other suites: test_fusedrl_bench.py)."""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.integration
def test_train_under_torchrun_reports_per_gpu_figures_from_rank_0(tmp_path):
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m",
         "fusedrl.engine.cli", "bench", "train", "--quick", f"output_dir={out}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    payload = json.loads((out / "results.json").read_text())
    assert payload["meta"]["world_size"] == 2 and payload["meta"]["ended"] == "complete"
    (row,) = payload["rows"]
    assert row["status"] == "ok" and row["world_size"] == 2
    assert row["tokens_per_s_total"] == pytest.approx(2 * row["tokens_per_s_per_gpu"])
    assert "tokens_per_s" not in row and row["n"] >= 3
    assert run.stdout.count("| fusedrl |") == 2  # rank 0's progress line and its table only
    assert len((out / "results.jsonl").read_text().splitlines()) == 1

