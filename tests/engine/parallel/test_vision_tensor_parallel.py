"""Tensor parallelism with images under torchrun (2 gloo CPU ranks): the decoder of a tiny random
Qwen2.5-VL (and Qwen3-VL) sliced over T=2 tensor ranks as a text model's, the vision tower whole on
both. Its fp32 logits on two images and text equal one process's, the trained tower's gradients
are the same on both ranks (vlm_tp_worker.py), and GRPO and SFT on rows with images, the tower
trained, run at T=2 to one process's losses and weights."""
import os

import pytest
import torch
from safetensors.torch import load_file

from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.config.train import DataConfig, OptimConfig, SFTConfig, TrainConfig
from fusedrl.engine.demos.vision import build_vision_model
from fusedrl.engine.demos.vision_task import build_vision_processor, write_vision_data
from fusedrl.engine.stages.ppo.trainer import train_ppo
from fusedrl.engine.stages.sft import train_sft
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


def sft_config(root, base, data, name, t=1):
    return SFTConfig(
        model=base, output_dir=str(root / name), seed=0,
        data=DataConfig(train_file=data["sft"], tokens_per_batch=8 * 32, max_length=32,
                        max_prompt_length=28, eval_fraction=0),
        optim=OptimConfig(lr=1e-3, eps=1e-6, warmup_steps=0, weight_decay=0.0),
        train=TrainConfig(epochs=1, eval_every=0, device="cpu", progress=False, resume=False,
                          precision="fp32", train_vision=True, tensor_parallel=t))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """GRPO and SFT of the tiny Qwen2.5-VL with the tower trained: one process's runs (one/,
    sft_one/) and the same at T=2 on 2 ranks in one launch (t2/, sft_t2/)."""
    root = tmp_path_factory.mktemp("vision_tp")
    base = build_vision_model(root / "base", 0, build_vision_processor())
    data = write_vision_data(16, 2, 0.0, 0, root / "data")
    with rank_threads():
        train_ppo(grpo_config(root, base, data, "one"))
        train_sft(sft_config(root, base, data, "sft_one"))
    check(torchrun_runs([stage_run("grpo", grpo_config(root, base, data, "t2", 2)),
                         stage_run("sft", sft_config(root, base, data, "sft_t2", 2))],
                        root, timeout=300))
    return root, base


def train_metrics(run, key):
    return [r[key] for r in read_metrics(run) if r["kind"] == "train"]


def assert_same_weights_and_a_trained_tower(base, one_dir, t2_dir):
    """The two exports within 1e-4 of max |w| of each other (plus 1e-6, a thousandth of one Adam
    step at lr 1e-3: a bias that starts at 0 has a max |w| of a few steps, and Adam scales up the
    rounding of a near-zero gradient summed in another order), the tower moved from `base`."""
    one = load_file(one_dir / "final" / "model.safetensors")
    t2 = load_file(t2_dir / "final" / "model.safetensors")
    before = load_file(os.path.join(base, "model.safetensors"))
    tower = [k for k in one if "visual." in k]
    assert one.keys() == t2.keys() and tower
    assert any(not torch.equal(one[k], before[k]) for k in tower)  # the tower trained
    for k in one:
        assert (one[k] - t2[k]).abs().max().item() <= 1e-4 * one[k].abs().max().item() + 1e-6, k


def test_grpo_with_images_and_a_trained_tower_at_two_tensor_ranks_trains_as_one_process(runs):
    root, base = runs
    assert len(train_metrics(root / "t2", "loss")) == 2
    assert train_metrics(root / "t2", "tokens") == train_metrics(root / "one", "tokens")
    assert any(train_metrics(root / "one", "score_std"))  # the update moves the weights
    for key in ("loss", "kl_loss", "score_mean", "grad_norm"):
        assert train_metrics(root / "t2", key) == pytest.approx(
            train_metrics(root / "one", key), rel=1e-4, abs=1e-6), key
    assert_same_weights_and_a_trained_tower(base, root / "one", root / "t2")


def test_sft_with_images_and_a_trained_tower_at_two_tensor_ranks_trains_as_one_process(runs):
    root, base = runs
    losses = train_metrics(root / "sft_one", "loss")
    assert len(losses) >= 2
    assert train_metrics(root / "sft_t2", "loss") == pytest.approx(losses, rel=1e-4)
    assert_same_weights_and_a_trained_tower(base, root / "sft_one", root / "sft_t2")
