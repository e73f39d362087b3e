"""rollout.tokens_per_forward: the scoring forwards (reward model, reference, old log-probs, values)
cut into micro-batches of at most that many tokens give what one forward over the whole pack gives."""
import dataclasses

import pytest
import torch

from fusedrl.engine.config.ppo import LoopConfig, PPOConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.reward_model import reward_model_from_lm, save_reward_model
from fusedrl.engine.stages.rollout.microbatches import microbatches
from fusedrl.engine.stages.ppo.advantages import RunningMoments
from fusedrl.engine.stages.ppo.experience import ExperienceSettings, make_rollout
from fusedrl.engine.stages.rollout.phase_timer import PhaseTimer
from fusedrl.engine.stages.rollout.answer_rows import sample_and_score
from fusedrl.engine.stages.rollout.reward_scores import score_rows
from fusedrl.engine.stages.rollout.build import build_models
from engine_testing import random_prompts
from train_testing import save_tiny_model, write_jsonl


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on two (pytest -n 0 on 2 cores) the CPU's GEMMs split
    their rows over threads by the batch's size, so a micro-batch and the whole batch round apart
    by more than their own order does (3.9e-5 relative, measured), which is not what this tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_scoring_in_microbatches_equals_scoring_whole(tmp_path, one_thread):
    policy_dir = save_tiny_model(tmp_path / "policy")
    rm = reward_model_from_lm(load_model(policy_dir))
    torch.nn.init.normal_(rm.score.weight)
    save_reward_model(rm, tmp_path / "rm", source_dir=policy_dir)
    cfg = PPOConfig(policy=str(policy_dir), reward_model=str(tmp_path / "rm"), critic="separate",
                    prompts_file=str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])),
                    output_dir=str(tmp_path / "out"), ppo=UpdateConfig(epochs=1, minibatch_size=6),
                    rollout=RolloutConfig(prompts_per_iteration=3, samples_per_prompt=2, max_new_tokens=6,
                                          max_prompt_length=6, kv_cache_memory=1 << 22, tokens_per_forward=12),
                    train=LoopConfig(iterations=1, progress=False, device="cpu"))
    from transformers import AutoTokenizer
    models = build_models(cfg, torch.device("cpu"), torch.float32, AutoTokenizer.from_pretrained(policy_dir), None)
    timer = PhaseTimer(torch.device("cpu"))
    samples = sample_and_score(models, random_prompts([4, 6, 5], seed=3), cfg.rollout, 0, timer)
    packed = samples.packed
    cut = microbatches(packed, 12)
    assert len(cut) >= 3 and all(sum(p.seqlens) <= 12 for p in cut)
    assert [n for p in cut for n in p.seqlens] == packed.seqlens                    # every row once, in order
    with torch.no_grad():
        whole = score_rows(models.score, samples.prompts, samples.responses, packed)
    # fp32 GEMMs over fewer rows round in another order: a few units in the last place.
    torch.testing.assert_close(samples.scores, whole.float(), rtol=1e-5, atol=1e-6)

    def rollout(budget):
        s = dataclasses.replace(ExperienceSettings.of(cfg), tokens_per_forward=budget)
        return make_rollout(models, samples, s, 0.05, RunningMoments(), timer).rollout

    a, b = rollout(12), rollout(None)
    for field in ("ref_logprobs", "old_logprobs", "old_values", "advantages"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-6, msg=field)


def test_the_budget_must_hold_one_row():
    with pytest.raises(ValueError, match=r"rollout.tokens_per_forward=100 must hold one row: .* = 320 tokens"):
        RolloutConfig(tokens_per_forward=100)
    assert RolloutConfig(tokens_per_forward=None).tokens_per_forward is None
