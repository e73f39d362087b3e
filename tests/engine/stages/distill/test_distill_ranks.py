"""On-policy distillation under torchrun (gloo CPU ranks): the teacher laid out as the reference is,
FSDP2 shards over 2 data ranks and 2 tensor ranks, each trains one process's student. The per-rank
sizes make the comparison exact: rollout.prompts_per_iteration and ppo.minibatch_size are per data
rank, so 2 data ranks run half of each (one minibatch of the whole rollout), and T=2 on 2 ranks (one
data rank) runs one process's config."""
import pytest
import torch
from safetensors.torch import load_file

from fusedrl.engine.config.distill import DistillConfig, DistillSection
from fusedrl.engine.config.ppo import LoopConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.config.train import OptimConfig
from fusedrl.engine.stages.distill.trainer import train_distill
from fusedrl.engine.train.runlog import read_metrics
from dist_testing import check, rank_threads, stage_run, torchrun_runs
from train_testing import save_tiny_model, write_jsonl

PROMPTS = ["the quick brown", "hello world", "lazy dog", "fox jumps", "over the", "brown fox"]


def config(root, name, data_ranks=1, t=1):
    # 4 prompts x 2 samples an iteration in all. Adam's eps 1e-6: an element whose gradient is near
    # 0 (rounding where the ranks sum in another order) would otherwise take an update of order lr.
    return DistillConfig(policy=str(root / "student"), teacher=str(root / "teacher"),
                         prompts_file=str(root / "prompts.jsonl"), output_dir=str(root / name),
                         distill=DistillSection(beta=0.5),
                         rollout=RolloutConfig(prompts_per_iteration=4 // data_ranks,
                                               samples_per_prompt=2, max_new_tokens=6,
                                               kv_cache_memory=1 << 22),
                         ppo=UpdateConfig(estimator="grpo", kl_loss_coef=0.0, vf_coef=0.0, epochs=1,
                                          minibatch_size=8 // data_ranks),
                         optim=OptimConfig(lr=1e-3, eps=1e-6),
                         train=LoopConfig(iterations=2, progress=False, device="cpu",
                                          precision="fp32", tensor_parallel=t))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process's run, and in one launch of 2 ranks: 2 data ranks (FSDP2) and T=2."""
    root = tmp_path_factory.mktemp("distill_ranks")
    save_tiny_model(root / "student")  # llama2: 4 key/value heads, untied head
    save_tiny_model(root / "teacher", seed=1, hidden_size=96, intermediate_size=160)
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    with rank_threads():
        train_distill(config(root, "one"))
    check(torchrun_runs([stage_run("distill", config(root, "dp2", data_ranks=2)),
                         stage_run("distill", config(root, "t2", t=2))], root, timeout=600))
    return root


def max_relative_diff(dir_a, dir_b) -> float:
    a, b = (load_file(d / "model.safetensors") for d in (dir_a, dir_b))
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)


def train_metrics(run, key):
    return [r[key] for r in read_metrics(run) if r["kind"] == "train"]


@pytest.mark.parametrize("name", ["dp2", "t2"])
def test_ranks_train_one_process_s_student(runs, name):
    assert max_relative_diff(runs / "one" / "final", runs / name / "final") <= 1e-4
    for key in ("divergence", "entropy", "teacher_logprob", "grad_norm"):
        assert train_metrics(runs / name, key) == pytest.approx(train_metrics(runs / "one", key),
                                                                rel=1e-4), key
    assert train_metrics(runs / name, "tokens") == train_metrics(runs / "one", "tokens")
    assert all(torch.isfinite(torch.tensor(train_metrics(runs / name, "loss"))))
