"""Prefix sharing: a group's rows forwarded as its prompt once and its answers, each answer reading
the prompt and itself, give the log-probs, values, rewards and gradients of the rows read whole."""
import pytest
import torch

from fusedrl.engine.data.packing import pack
from fusedrl.engine.data.prefix_sharing import grouped_order, share_prefixes
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.reward_model import reward_model_from_lm
from fusedrl.engine.model.scalar_head import ScalarHead
from fusedrl.engine.model.value_model import values_at_targets
from fusedrl.engine.stages.ppo.forwards import response_logprobs
from fusedrl.engine.stages.rollout.packs import concat_packs, pack_rollout
from engine_testing import random_prompts
from train_testing import save_tiny_model

# Two groups of 3 answers of uneven lengths, plus a prompt answered once.
PROMPT_LENGTHS = [5, 9, 4]
ANSWER_LENGTHS = [[3, 7, 1], [4, 2, 6], [5]]


def rollout_rows(seed=0):
    prompts = random_prompts(PROMPT_LENGTHS, seed=seed)
    answers = random_prompts([n for group in ANSWER_LENGTHS for n in group], seed=seed + 1)
    rows = [prompt for prompt, group in zip(prompts, ANSWER_LENGTHS) for _ in group]
    return rows, answers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # GQA and a tied head.
    return save_tiny_model(tmp_path_factory.mktemp("shared") / "qwen2", arch="qwen2")


def counted_tokens(model):
    """A list filled with the ids each forward embeds (a real count of what the layers read)."""
    seen = []
    model.model.embed_tokens.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].numel()))
    return seen


def logprobs_and_grads(model, packed):
    model.zero_grad()
    logp, entropy, _ = response_logprobs(model, packed, 0.7, with_entropy=True)
    weights = torch.linspace(-1, 1, logp.numel()).view_as(logp)
    ((logp * weights).sum() + (entropy * packed.grid_mask()).sum()).backward()
    return logp.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_logprobs_and_gradients_equal_whole_rows(model_dir, checkpointing):
    model = load_model(model_dir)
    model.gradient_checkpointing = checkpointing
    seen = counted_tokens(model)
    prompts, answers = rollout_rows()
    whole, shared = (pack_rollout(prompts, answers, "cpu", share_prompts=s) for s in (False, True))
    logp_whole, grads_whole = logprobs_and_grads(model, whole)
    logp_shared, grads_shared = logprobs_and_grads(model, shared)
    # Each group's prompt read once: 5 + 9 + 4 prompt tokens and the answers' own.
    answers_total = sum(map(len, answers))
    assert shared.forwarded_tokens == 18 + answers_total < sum(whole.seqlens)
    assert seen[0] == sum(whole.seqlens) and seen[1] == shared.forwarded_tokens
    # fp32: the same sums in other padded shapes and another order (a prompt's gradient summed over
    # its answers at once), a few units in the last place: 1e-5 of each tensor's norm (elementwise,
    # gradients that nearly cancel would have no relative precision to compare).
    torch.testing.assert_close(logp_shared, logp_whole, rtol=1e-5, atol=1e-6)
    for name, grad in grads_whole.items():
        assert relative_error(grads_shared[name], grad) <= 1e-5, name


def relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_shared_values_and_rewards_equal_whole_rows(model_dir):
    model = load_model(model_dir)
    rm = reward_model_from_lm(model)
    torch.nn.init.normal_(rm.score.weight)
    head = ScalarHead(model.config.hidden_size)
    torch.nn.init.normal_(head.weight)
    prompts, answers = rollout_rows(seed=4)
    whole, shared = (pack_rollout(prompts, answers, "cpu", share_prompts=s) for s in (False, True))
    with torch.no_grad():
        assert_close_to_scale(values_at_targets(model, head, shared), values_at_targets(model, head, whole))
        assert_close_to_scale(rm.packed_rewards(shared), rm.packed_rewards(whole))


def assert_close_to_scale(got, want, rel=1e-5):
    """Elementwise within `rel` of the largest |want|: a value or reward is a dot product of the
    hidden state with a unit-normal head, whose fp32 rounding (the sums in other padded shapes and
    another order, or another thread count's matmul blocking) is a few units in the last place of
    its terms, not of a sum that nearly cancels (one measured at 1.9e-5 relative, 6e-6 absolute, of a
    0.33 value among values up to a few units)."""
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))


def test_bf16_shared_logprobs_within_bf16_rounding(model_dir):
    model = load_model(model_dir, dtype="bfloat16")
    prompts, answers = rollout_rows(seed=2)
    whole, shared = (pack_rollout(prompts, answers, "cpu", share_prompts=s) for s in (False, True))
    with torch.no_grad():
        a, b = (response_logprobs(model, p, 1.0)[0] for p in (whole, shared))
    # bf16 activations (8 bits of mantissa) summed in other padded shapes; log-probs of size ~5.
    torch.testing.assert_close(b, a, rtol=2e-2, atol=5e-2)


def test_selected_and_joined_packs_keep_their_groups():
    prompts, answers = rollout_rows()
    packed = pack_rollout(prompts, answers, "cpu", share_prompts=True)
    assert packed.prefix_groups == [0, 0, 0, 1, 1, 1, 2]
    assert packed.prompt_lens == [5] * 3 + [9] * 3 + [4]
    # Rows of one group apart in the order still share; a row alone is cut the same way.
    picked = packed.select([4, 0, 3, 6])
    layout = share_prefixes(picked)
    assert layout.seqlens_q == [9, 2, 4, 5, 3, 4, 5] and layout.seqlens_k == [9, 11, 13, 5, 8, 4, 9]
    assert grouped_order([4, 0, 3, 6, 1], packed.prefix_groups) == [4, 3, 0, 1, 6]
    joined = concat_packs([packed.select([0, 1]), packed.select([3, 4])])
    assert joined.prefix_groups == [0, 0, 2, 2] and joined.forwarded_tokens == 5 + 3 + 7 + 9 + 4 + 2


def test_token_budgets_count_a_shared_prompt_once():
    sizes, groups, prompt_lens = [10, 10, 10, 10], [0, 0, 0, 1], [8, 8, 8, 8]
    # Whole rows: two per budget of 20; shared: 10 + 2 + 2 for the group, then a new prompt.
    assert pack(sizes, 20) == [[0, 1], [2, 3]]
    assert pack(sizes, 20, shared=(groups, prompt_lens)) == [[0, 1, 2], [3]]
    assert pack(sizes, 13, shared=(groups, prompt_lens)) == [[0, 1], [2], [3]]
