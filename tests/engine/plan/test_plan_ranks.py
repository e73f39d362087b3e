"""Under torchrun (3 gloo ranks, FSDP2 full shard) the plan's per-GPU weights, gradients and
optimizer state are rank 0's real bytes after a step: FSDP2 cuts each parameter's rows in
ceil(rows / 3), so rank 0 holds the most (3 does not divide the tiny model's 128 q/k/v rows)."""
import json
from pathlib import Path

from fusedrl.engine.plan import phases
from fusedrl.engine.plan.planner import stage_setup
from dist_testing import run_ranks
from train_testing import save_tiny_model, sft_config

SCRIPT = Path(__file__).with_name("rank_bytes.py")


def test_plan_is_rank_zeros_real_shards(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", arch="llama2")
    ranks = 3
    result = run_ranks(SCRIPT, model_dir, tmp_path, nproc=ranks)
    assert result.returncode == 0, result.stderr[-4000:]
    real = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
    setup = stage_setup(sft_config(model_dir, tmp_path / "unused.jsonl", tmp_path / "out",
                                   train={"device": "cpu", "precision": "bf16-mixed"}), ranks)
    plan = {"weights": phases.weight_bytes(setup), "grads": phases.grad_bytes(setup),
            "optimizer": phases.optimizer_bytes(setup)}
    assert plan == real[0]
    assert all(r[k] <= real[0][k] for r in real for k in plan) and real[-1] != real[0]
