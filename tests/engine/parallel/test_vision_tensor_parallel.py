"""Tensor parallelism with images under torchrun (2 gloo CPU ranks): the decoder of a tiny random
Qwen2.5-VL (and Qwen3-VL) sliced over T=2 tensor ranks as a text model's, the vision tower whole on
both. Its fp32 logits on two images and text equal one process's, the trained tower's gradients
are the same on both ranks (vlm_tp_worker.py), and GRPO on rows with images, the tower trained, runs at T=2 to
one process's losses and weights."""
import os

import pytest
import torch
from safetensors.torch import load_file

from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.config.train import OptimConfig
from fusedrl.engine.demos.vision import build_vision_model
from fusedrl.engine.demos.vision_task import build_vision_processor, write_vision_data
from fusedrl.engine.stages.ppo.trainer import train_ppo
from fusedrl.engine.train.runlog import read_metrics
from dist_testing import check, rank_threads, run_ranks, stage_run, torchrun_runs
from vision_testing import FAMILIES, save_vlm

pytestmark = pytest.mark.integration


def test_tensor_parallel_logits_and_tower_gradients_equal_one_process_s(tmp_path):
    for family in FAMILIES:
        save_vlm(tmp_path / family, family)
    worker = os.path.join(os.path.dirname(__file__), "vlm_tp_worker.py")
    result = run_ranks(worker, *(tmp_path / family for family in FAMILIES))
    check(result)
    assert result.stdout.split() == ["ok"] * len(FAMILIES)


def spread_reward(completion_ids, **_):
    """A reward that differs between a group's answers (the demo's count is all wrong for the
    random model, its advantages 0): the sum of the answer's ids modulo 7, scaled to [0, 1)."""
    return [sum(ids) % 7 / 7 for ids in completion_ids]


def grpo_config(root, base, data, name, t=1):
    # Adam's eps 1e-6: an element whose gradient is near 0 (rounding where the slices sum in
    # another order) would otherwise take an update of order lr.
    cfg = GRPOConfig(
        policy=base, prompts_file=data["prompts"], output_dir=str(root / name), seed=0,
        reward_fn="test_vision_tensor_parallel:spread_reward",
        rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3, max_new_tokens=3,
                              kv_cache_memory=1 << 22, max_prompt_length=20),
        ppo=UpdateConfig(estimator="grpo", epochs=2, minibatch_size=6, vf_coef=0.0,
                         kl_loss_coef=0.05),
        optim=OptimConfig(lr=1e-3, eps=1e-6),
        train=LoopConfig(iterations=2, progress=False, device="cpu", precision="fp32",
                         resume=False, train_vision=True, tensor_parallel=t))
    cfg.reward.isolation = "thread"
    return cfg


def train_metrics(run, key):
    return [r[key] for r in read_metrics(run) if r["kind"] == "train"]


def test_grpo_with_images_and_a_trained_tower_at_two_tensor_ranks_trains_as_one_process(
        tmp_path):
    base = build_vision_model(tmp_path / "base", 0, build_vision_processor())
    data = write_vision_data(8, 2, 0.0, 0, tmp_path / "data")
    with rank_threads():
        train_ppo(grpo_config(tmp_path, base, data, "one"))
    check(torchrun_runs([stage_run("grpo", grpo_config(tmp_path, base, data, "t2", 2))],
                        tmp_path, timeout=300))
    assert len(train_metrics(tmp_path / "t2", "loss")) == 2
    assert train_metrics(tmp_path / "t2", "tokens") == train_metrics(tmp_path / "one", "tokens")
    assert any(train_metrics(tmp_path / "one", "score_std"))  # the update moves the weights
    for key in ("loss", "kl_loss", "score_mean", "grad_norm"):
        assert train_metrics(tmp_path / "t2", key) == pytest.approx(
            train_metrics(tmp_path / "one", key), rel=1e-4, abs=1e-6), key
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    t2 = load_file(tmp_path / "t2" / "final" / "model.safetensors")
    assert one.keys() == t2.keys() and any(k.startswith("visual.") or ".visual." in k for k in one)
    before = load_file(os.path.join(base, "model.safetensors"))
    tower = [k for k in one if "visual." in k]
    assert any(not torch.equal(one[k], before[k]) for k in tower)  # the tower trained
    for k in one:
        assert ((one[k] - t2[k]).abs().max() / one[k].abs().max()).item() <= 1e-4, k
