"""Partial rollouts with images (rollout.partial_rollouts on a tiny Qwen2.5-VL): every answer is cut
at the token budget in iteration 1 and carried; iteration 2 continues it with its prompt's images
and trains whole groups. A checkpoint names each row with images (its index and images' sha256,
no pixels); a resumed run reads it back from the data and ends with the uninterrupted run's weights
and rewards; under greedy sampling (top_k=1) a carried answer is the answer one uninterrupted
generation gives."""
import dataclasses
import json

import pytest
import torch

from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.data.prompts import load_prompts
from fusedrl.engine.demos.vision_task import count_reward
from fusedrl.engine.inference.image_prefill import image_digest
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.stages.ppo.trainer import train_ppo
from fusedrl.engine.train.runlog import read_metrics
from fusedrl.kernels import use_backend
from train_testing import checkpoint_data, copy_checkpoint
from vision_testing import vision_demo_run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("partial_vision")
    base, data, processor = vision_demo_run(root, held_out=0)
    return root, base, data["prompts"], processor


def grpo(root, base, prompts, run, partial=True, **rollout):
    # 6-token answers (EOS ignored), 4 groups of 3 in flight: a 26-token budget draws 3 tokens a
    # row in iteration 1, so every answer is carried once.
    if partial:
        rollout.update(partial_rollouts=True, tokens_per_iteration=26, max_staleness=1)
    cfg = GRPOConfig(
        policy=base, prompts_file=prompts, output_dir=str(root / run), seed=0,
        rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3, max_new_tokens=6,
                              ignore_eos=True, kv_cache_memory=1 << 22, max_prompt_length=20,
                              **rollout),
        ppo=UpdateConfig(estimator="grpo", epochs=1, minibatch_size=3, vf_coef=0.0),
        train=LoopConfig(iterations=2, save_every=1, keep_checkpoints=0, progress=False,
                         device="cpu"))
    cfg.reward.isolation = "thread"
    return cfg


def run(cfg) -> list:
    """train_ppo on the torch kernels; returns what the reward saw, call by call: (prompt
    messages, completion ids, image paths) per row."""
    seen = []

    def reward(prompts, completions, completion_ids, answer, images, **_):
        seen.append([(json.dumps(p), list(c), list(i))
                     for p, c, i in zip(prompts, completion_ids, images)])
        return count_reward(completions, answer)
    with use_backend("torch"):  # the carrying is under test, not the kernels
        train_ppo(cfg, reward_fn=reward)
    return seen


@pytest.fixture(scope="module")
def straight(setup):
    """Two iterations of greedy partial rollouts (top_k=1): every answer cut at the budget in
    iteration 1 and carried, the first two groups trained in iteration 2 -> what the reward saw."""
    root, base, prompts, _ = setup
    return run(grpo(root, base, prompts, "straight", top_k=1))


def test_carried_answers_keep_their_images_and_resume_exactly(setup, straight):
    root, base, prompts, processor = setup
    train = [r for r in read_metrics(root / "straight") if r["kind"] == "train"]
    assert [(r["carried"], r["groups_trained"]) for r in train] == [(12, 0), (0, 2)], train
    assert "policy_loss" in train[1] and train[1]["staleness_max"] == 1
    # The checkpoint names each row with images; none of its pixels are in it.
    rows, _ = load_prompts(prompts, processor, 20, 4096)
    saved = checkpoint_data(root / "straight" / "checkpoints" / "step-00000001")
    in_flight = saved["loop"]["in_flight"]
    assert len(in_flight) == 4
    for group in in_flight:
        row = rows[group["source"]["row"]]
        assert group["source"] == {"row": row.index, "images_sha256": image_digest(row.images)}
        assert group["prompt"] == row.ids and all(len(s["answer"]) == 3 for s in group["samples"])
    copy_checkpoint(root / "straight", 1, root / "resumed")
    resumed = run(grpo(root, base, prompts, "resumed", top_k=1))
    assert resumed == straight and len(straight) == 1 and len(straight[0]) == 6
    a, b = (load_model(root / r / "final").state_dict() for r in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The groups trained are the first two carried, each row with its own prompt row's images.
    named = [rows[g["source"]["row"]].columns["images"] for g in in_flight[:2] for _ in range(3)]
    assert [images for _, _, images in straight[0]] == named and named[0] != named[3]


def test_a_carried_answer_is_the_uninterrupted_answer_under_greedy_sampling(setup, straight):
    """The trained answers, cut in iteration 1 and continued in iteration 2 under the same weights
    (nothing trained in between), are those whole groups draw for the same prompts in one
    generation."""
    root, base, prompts, _ = setup
    whole = run(dataclasses.replace(grpo(root, base, prompts, "whole", partial=False, top_k=1),
                                    train=LoopConfig(iterations=1, progress=False, device="cpu")))
    assert len(whole) == 1 and straight[0] == whole[0]
    # Every prompt's text is the same question: the answers differ by their images alone.
    assert len({tuple(c) for _, c, _ in whole[0]}) > 1
