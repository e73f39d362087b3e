"""The plan's activation rules against real forwards and backwards on the CPU: the peak bytes of
the tensors alive (live_bytes.py) of the update's forward + backward (with and without gradient
checkpointing, with and without prefix sharing) and of a scoring forward, at two token budgets.

The CPU runs the decoder's torch ops (fused=False in the rules); the fused kernels' path, measured
the same way under the Triton interpreter (too slow for the suite), is within 11% of the fused
rules (docs/long_training.md)."""
import pytest
import torch

from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.plan.activations import (forward_activations, shared_prefix_tokens,
                                             training_activations)
from fusedrl.engine.stages.ppo.forwards import response_logprobs
from fusedrl.engine.stages.rollout.packs import pack_rollout
from engine_testing import random_prompts
from live_bytes import LiveBytes
from train_testing import save_tiny_model

PROMPT, ANSWER, GROUP = 24, 8, 4   # an agent-like row: a long shared history, a short answer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # GQA: 4 query heads over 2 key/value heads.
    return load_model(save_tiny_model(tmp_path_factory.mktemp("measured") / "llama", arch="llama"))


def measured(model, groups: int, share: bool, checkpointing: bool,
             train: bool) -> tuple[int, int, int]:
    """(peak activation bytes, the plan's, forwarded tokens) of one forward (+ backward when train)
    over `groups` groups of GROUP rows."""
    prompts = [p for p in random_prompts([PROMPT] * groups) for _ in range(GROUP)]
    answers = random_prompts([ANSWER] * groups * GROUP, seed=1)
    packed = pack_rollout(prompts, answers, "cpu", share_prompts=share)
    tokens, keys = shared_prefix_tokens(groups * GROUP, GROUP, PROMPT, ANSWER, share)
    assert tokens == packed.forwarded_tokens
    model.set_recompute(checkpointing)
    model.zero_grad(set_to_none=True)
    with LiveBytes() as live:
        if train:
            response_logprobs(model, packed, 1.0)[0].sum().backward()
        else:
            with torch.no_grad():
                response_logprobs(model, packed, 1.0)
    c = model.config
    if train:
        plan = training_activations(c, 4, checkpointing, tokens, True, shared_keys=keys,
                                    fused=False)
    else:
        plan = forward_activations(c, 4, tokens, True, shared_keys=keys)
    return live.peak, plan, tokens


@pytest.mark.parametrize("share, checkpointing, train", [
    (False, False, True), (False, True, True), (True, False, True), (True, True, True),
    (False, False, False), (True, False, False)])
def test_the_plan_is_within_ten_percent_of_the_measured_peak(model, share, checkpointing, train):
    (peak_a, plan_a, tokens_a), (peak_b, plan_b, tokens_b) = (
        measured(model, groups, share, checkpointing, train) for groups in (1, 2))
    for peak, plan in ((peak_a, plan_a), (peak_b, plan_b)):
        assert abs(plan - peak) <= 0.10 * peak, (plan, peak)
    # The bar: bytes per extra token of the plan within 25% of the measured growth between budgets.
    extra = tokens_b - tokens_a
    growth, slope = (peak_b - peak_a) / extra, (plan_b - plan_a) / extra
    assert abs(slope - growth) <= 0.25 * growth, (slope, growth)
