"""Critic-free pieces of an iteration: overlong shaping, dynamic sampling, group advantages on tokens."""
import pytest
import torch

from fusedrl.engine.config.ppo import GRPOConfig, PPOConfig, RolloutConfig
from fusedrl.engine.stages.rollout.group_advantages import group_token_advantages
from fusedrl.engine.stages.rollout.packs import concat_packs, pack_rollout
from fusedrl.engine.stages.rollout.scored_rows import Samples
from fusedrl.engine.stages.rollout.sampled_rows import overlong_penalty
from fusedrl.engine.stages.rollout.dynamic_sampling import draw_samples, keep_varied, varied_groups


def grpo_config(**rollout):
    return GRPOConfig(policy="p", prompts_file="f", output_dir="o",
                      rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=2, max_new_tokens=10,
                                            **rollout))


def test_overlong_penalty_is_dapo_s_linear_ramp():
    # max 10 tokens, buffer 4: no penalty up to 6 tokens, then -(L - 6) / 4, -1 at 10.
    lengths = [3, 6, 7, 8, 10]
    assert overlong_penalty(lengths, 10, 4, 1.0) == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty(lengths, 10, 4, 2.0)[-1] == -2.0
    assert overlong_penalty(lengths, 10, 0, 1.0) == [0.0] * 5


def test_varied_groups_are_those_with_unequal_scores():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 2.0])    # groups of 2
    assert varied_groups(scores, 2) == [1, 3]


def fake_sampler(score_rows):
    """sample(prompts, seed) returning the next scores of `score_rows` (one entry per call)."""
    calls = iter(score_rows)

    def sample(prompts, seed):
        scores = torch.tensor(next(calls), dtype=torch.float32)
        n = scores.numel() // len(prompts)
        rows = [p for p in prompts for _ in range(n)]
        responses = [[7] * (1 + r % 3) for r in range(len(rows))]   # rounds of different grid widths
        packed = pack_rollout(rows, responses, "cpu")
        return Samples(rows, responses, packed, packed.to_grid(-torch.arange(1.0, 1 + packed.num_targets)), scores, n)
    return sample


def test_dynamic_sampling_draws_until_the_batch_is_full():
    cfg = grpo_config(dynamic_sampling=True, max_sampling_rounds=4)
    prompts = iter([[[1]], [[2]]] + [[[3]], [[4]]] + [[[5]], [[6]]])
    stream = lambda: [next(prompts)[0], next(prompts)[0]]  # noqa: E731  (two prompts per draw)
    # round 1: groups (1, 1) dropped, (0, 1) kept; round 2: (2, 2) dropped, (0, 3) kept -> full
    samples, metrics = draw_samples(stream, fake_sampler([[1, 1, 0, 1], [2, 2, 0, 3]]), cfg.rollout, seed=0)
    assert samples.prompts == [[2], [2], [4], [4]] and samples.scores.tolist() == [0, 1, 0, 3]
    # The kept rows' pack and sampler log-probs, cut from each round's and joined on the widest grid.
    assert samples.packed.seqlens == [1 + 3, 1 + 1, 1 + 3, 1 + 1] and samples.packed.width == 3
    assert samples.sampler_logprobs.tolist() == [[-4, -5, -6], [-7, 0, 0], [-4, -5, -6], [-7, 0, 0]]
    assert metrics == {"sampling_rounds": 2, "groups_drawn": 4, "groups_kept": 2}


def test_dynamic_sampling_stops_at_its_cap_with_what_it_has():
    cfg = grpo_config(dynamic_sampling=True, max_sampling_rounds=2)
    stream = lambda: [[1], [2]]  # noqa: E731
    samples, metrics = draw_samples(stream, fake_sampler([[1, 1, 1, 1], [0, 0, 0, 5]]), cfg.rollout, seed=0)
    assert samples.groups == 1 and samples.scores.tolist() == [0, 5] and metrics["sampling_rounds"] == 2
    samples, _ = draw_samples(stream, fake_sampler([[1, 1, 1, 1], [0, 0, 2, 2]]), cfg.rollout, seed=0)
    assert samples.groups == 0     # nothing to learn from: the trainer skips the iteration


def test_partial_rollouts_keep_the_varied_groups_of_those_complete():
    samples = fake_sampler([[1, 1, 0, 1, 2, 2]])([[1], [2], [3]], 0)
    kept, counts = keep_varied(samples)
    assert kept.prompts == [[2], [2]] and kept.scores.tolist() == [0, 1]
    assert counts == {"groups_drawn": 3, "groups_kept": 1}
    assert keep_varied(fake_sampler([[1, 1]])([[1]], 0))[0].groups == 0


def test_concatenated_packs_equal_one_pack_of_all_rows():
    prompts, responses = [[1, 2], [3], [4, 5, 6]], [[7, 8, 9], [10], [11, 12]]
    parts = [pack_rollout(prompts[:2], responses[:2], "cpu"), pack_rollout(prompts[2:], responses[2:], "cpu")]
    joined, whole = concat_packs(parts), pack_rollout(prompts, responses, "cpu")
    assert parts[1].width == 2 and joined.width == whole.width == 3
    for name in ("input_ids", "target_rows", "target_ids", "grid_index", "positions", "cu_seqlens"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name
    assert joined.seqlens == whole.seqlens and joined.target_counts == whole.target_counts
    # and a cut of it is the pack of those rows
    cut, rows = joined.select([2, 0]), pack_rollout([prompts[2], prompts[0]], [responses[2], responses[0]], "cpu", 3)
    for name in ("input_ids", "target_rows", "target_ids", "grid_index", "positions", "cu_seqlens"):
        assert torch.equal(getattr(cut, name), getattr(rows, name)), name


def test_without_dynamic_sampling_every_group_is_kept():
    samples, metrics = draw_samples(lambda: [[1], [2]], fake_sampler([[1, 1, 0, 0]]), grpo_config().rollout, seed=0)
    assert samples.groups == 2 and metrics == {}


def test_group_advantages_cover_each_row_s_tokens():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0])                        # groups of 2: (1, 0), (0, 0)
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True], [False] * 3])
    adv = group_token_advantages(scores, mask, 2, "dr_grpo")
    # dr_grpo: score - group mean: 0.5, -0.5 for group 0, 0, 0 for group 1; zero off the mask
    assert adv.tolist() == [[0.5, 0.5, 0.0], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_config_ties_group_estimators_to_critic_none():
    with pytest.raises(ValueError, match="is critic-free: set critic=none"):
        GRPOConfig(policy="p", prompts_file="f", output_dir="o", critic="shared")
    with pytest.raises(ValueError, match="needs a critic"):
        PPOConfig(policy="p", prompts_file="f", output_dir="o", critic="none")
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2"):
        GRPOConfig(policy="p", prompts_file="f", output_dir="o", rollout=RolloutConfig(samples_per_prompt=1))
    with pytest.raises(ValueError, match="needs a group estimator"):
        PPOConfig(policy="p", prompts_file="f", output_dir="o", rollout=RolloutConfig(dynamic_sampling=True))
