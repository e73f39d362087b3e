"""`fusedrl bench train` and `rl` under torchrun: two gloo ranks on the CPU each run every case
(the timed loop's repetition count agreed across them, train's gradients all-reduced, rl's policy
FSDP-sharded), rank 0 alone writes the record, whose rows give tokens/s per GPU and over all of
them with the world size (the refusal of the other suites: test_fusedrl_bench.py); what the ranks
agree on, checked on each (ranks_worker.py)."""
import json
import os
import subprocess
import sys

import pytest


def bench_on_two_ranks(suite: str, tmp_path, timeout: int):
    """`fusedrl bench SUITE --quick` under torchrun on 2 gloo ranks (the PyTorch backend, a thread
    each) -> (the finished subprocess.CompletedProcess, its results.json as a dict)."""
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m",
         "fusedrl.engine.cli", "bench", suite, "--quick", f"output_dir={out}"],
        capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
        env={**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return run, json.loads((out / "results.json").read_text())


@pytest.mark.integration
def test_train_under_torchrun_reports_per_gpu_figures_from_rank_0(tmp_path):
    run, payload = bench_on_two_ranks("train", tmp_path, 120)
    assert payload["meta"]["world_size"] == 2 and payload["meta"]["ended"] == "complete"
    row, graph = payload["rows"]
    assert row["status"] == "ok" and row["world_size"] == 2
    assert row["tokens_per_s_total"] == pytest.approx(2 * row["tokens_per_s_per_gpu"])
    assert "tokens_per_s" not in row and row["n"] >= 3
    assert graph["impl"] == "fusedrl CUDA graph" and graph["status"].startswith("not run: CUDA")
    assert run.stdout.count("| fusedrl |") == 2  # rank 0's progress line and its table only
    assert len((tmp_path / "run" / "results.jsonl").read_text().splitlines()) == 2


@pytest.mark.integration
def test_rl_under_torchrun_runs_to_the_end_with_per_gpu_rows_from_rank_0(tmp_path):
    """Both ranks run both iterations (the policy FSDP-sharded over them, gathered for each
    rollout) from the checkpoints rank 0 wrote; the TRL rows say why they were not run."""
    from fusedrl.bench.suites import rl
    run, payload = bench_on_two_ranks("rl", tmp_path, 240)
    assert payload["meta"]["world_size"] == 2 and payload["meta"]["ended"] == "complete"
    rows = payload["rows"]
    assert [(r["name"].split()[0], r["impl"].split()[0]) for r in rows] == [
        ("grpo", "fusedrl"), ("grpo", "trl"), ("ppo", "fusedrl"), ("ppo", "trl")]
    for row in rows[0::2]:
        assert row["status"] == "ok" and row["world_size"] == 2, row
        assert row["tokens_per_s_per_gpu"] > 0 and "tokens_per_s" not in row
        assert row["tokens_per_s_total"] == pytest.approx(2 * row["tokens_per_s_per_gpu"])
        assert row["time_generate"] > 0 and row["time_train"] > 0 and row["weight_sync_s"] >= 0
    for algo, row in zip(("grpo", "ppo"), rows[1::2]):
        installed = rl.peer_status(algo)[0] is not None
        assert row["status"] == rl.SEVERAL_RANKS_PEER if installed \
            else row["status"].startswith("not installed"), row
    streamed = (tmp_path / "run" / "results.jsonl").read_text().splitlines()
    assert len(streamed) == 4  # rank 0 alone writes
    assert run.stdout.count("| fusedrl |") == 4  # rank 0's progress lines and its table only


@pytest.mark.integration
def test_ranks_agree_on_what_rank_0_made_its_errors_and_the_deadline(tmp_path):
    """ranks.made_once hands rank 0's value (or its error) to every rank; the run's deadline passed
    on one rank has passed on all; no case timer runs (ranks_worker.py checks each on each rank)."""
    worker = os.path.join(os.path.dirname(__file__), "ranks_worker.py")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", worker,
         str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "rank 0 ok" in run.stdout and "rank 1 ok" in run.stdout
    assert len(list(tmp_path.glob("made_by_*"))) == 1
