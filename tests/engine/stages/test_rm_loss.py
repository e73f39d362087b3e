"""Reward-model loss on hand-computed cases: pairwise, K-way (all K-choose-2 pairs), beta_rm; every
pair of a batch at once, against a loop over its rankings."""
import math
import random

import pytest
import torch
from torch import nn

from fusedrl.engine.data.packing import pack_sequences
from fusedrl.engine.stages.rm import ranking_loss_sum, ranking_pairs
from fusedrl.engine.stages.rm import rm_loss, rm_summarize


def softplus(x):  # -log sigmoid(m) == softplus(-m)
    return math.log1p(math.exp(x))


def test_pairwise_loss_and_accuracy_by_hand():
    # Two pairs: margins +2 (right) and -1 (wrong): -log sigmoid(2) = log(1 + e^-2) = 0.126928,
    # -log sigmoid(-1) = log(1 + e) = 1.313262.
    loss, correct, pairs = ranking_loss_sum(torch.tensor([2.0, 0.0, 0.0, 1.0]), [2, 2])
    assert loss.item() == pytest.approx(0.126928 + 1.313262, abs=1e-6)
    assert (correct.item(), pairs) == (1, 2)


def test_k_way_ranking_is_the_mean_over_all_pairs_of_one_element():
    # Ranking best first with rewards [1, 0, 2]: pairs (0,1) margin 1, (0,2) margin -1, (1,2) margin -2
    # -> (0.313262 + 1.313262 + 2.126928) / 3 = 1.251151; one element, so the sum is that mean.
    loss, correct, pairs = ranking_loss_sum(torch.tensor([1.0, 0.0, 2.0]), [3])
    assert loss.item() == pytest.approx((0.313262 + 1.313262 + 2.126928) / 3, abs=1e-6)
    assert (correct.item(), pairs) == (1, 3)
    rows, weights = ranking_pairs([2, 4])
    assert rows.tolist() == [[0, 2, 2, 2, 3, 3, 4], [1, 3, 4, 5, 4, 5, 5]]
    assert weights.tolist() == [1.0] + [1 / 6] * 6


def test_k_way_and_pair_elements_weigh_the_same_in_a_batch():
    rewards = torch.tensor([1.0, 0.0, 2.0, 3.0, 3.0])  # a 3-way element, then a tied pair (log 2)
    loss, _, pairs = ranking_loss_sum(rewards, [3, 2])
    assert loss.item() == pytest.approx(1.251151 + math.log(2), abs=1e-6)
    assert pairs == 4


def test_ranking_loss_gradient_pushes_preferred_up():
    rewards = torch.zeros(3, requires_grad=True)
    ranking_loss_sum(rewards, [3])[0].backward()
    # d/dr_i of mean over pairs of softplus(r_j - r_i): best gets -(2 * 0.5) / 3, worst +1/3.
    torch.testing.assert_close(rewards.grad, torch.tensor([-1 / 3, 0.0, 1 / 3]))


def loop_over_rankings(rewards, group_sizes):
    """The oracle: each ranking's mean over its pairs, one ranking at a time."""
    losses, correct = [], 0
    for r in rewards.split(group_sizes):
        margins = [r[i] - r[j] for i in range(len(r)) for j in range(i + 1, len(r))]
        losses.append(torch.stack([-torch.nn.functional.logsigmoid(m) for m in margins]).mean())
        correct += sum(int(m > 0) for m in margins)
    return torch.stack(losses).sum(), correct


@pytest.mark.parametrize("seed", range(4))
def test_every_pair_at_once_is_the_loop_over_rankings_in_values_and_gradients(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([2, 2, 3, 4, 7]) for _ in range(rng.randint(1, 30))]
    torch.manual_seed(seed)
    rewards = (torch.randn(sum(sizes), dtype=torch.float64) * 3).requires_grad_()
    rewards.data[1] = rewards.data[0]  # a tie: not correct
    loss, correct, pairs = ranking_loss_sum(rewards, sizes)
    (grad,) = torch.autograd.grad(loss, rewards)
    want, want_correct = loop_over_rankings(rewards, sizes)
    (want_grad,) = torch.autograd.grad(want, rewards)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    assert (correct.item(), pairs) == (want_correct, sum(k * (k - 1) // 2 for k in sizes))


def test_a_ranking_of_one_response_or_a_score_count_off_its_groups_is_refused():
    with pytest.raises(ValueError, match=r"group_sizes=\[2, 1\]: every ranking needs at least 2"):
        ranking_loss_sum(torch.zeros(3), [2, 1])
    with pytest.raises(ValueError, match=r"rewards is \(4,\): expected \[5\]"):
        ranking_loss_sum(torch.zeros(4), [2, 3])


class FixedRewardModel(nn.Module):
    """Duck-typed reward model: given rewards, and an all-zero LM head over 4 tokens, so every
    token's log-probability is log(1/4) and the per-token NLL is log 4 = 1.386294."""

    def __init__(self, rewards):
        super().__init__()
        self.rewards = torch.tensor(rewards)
        self.lm_head = nn.Linear(3, 4, bias=False)
        nn.init.zeros_(self.lm_head.weight)

    def forward_packed(self, input_ids, seqlens, positions=None, cu_seqlens=None):
        return torch.ones(len(input_ids), 3)

    def raw_rewards(self, hidden, seqlens):
        return self.rewards


def rm_batch():
    # One pair: prompt [1] + chosen [2, 3] and prompt [1] + rejected [3]; LM labels on chosen only.
    return pack_sequences([([1], [2, 3], True), ([1], [3], False)], group_sizes=[2])


def test_beta_rm_adds_the_chosen_response_token_nll():
    model, batch = FixedRewardModel([2.0, 0.0]), rm_batch()
    counts = {"examples": 1, "lm_tokens": 2}
    loss, stats = rm_loss(model, batch, counts, beta_rm=0.5)
    # 0.126928 (pair, margin 2) + 0.5 * log 4
    assert loss.item() == pytest.approx(0.126928 + 0.5 * math.log(4), abs=1e-6)
    assert stats["nll_sum"] == pytest.approx(2 * math.log(4), abs=1e-5)
    summary = rm_summarize(stats, counts, beta_rm=0.5)
    assert summary["loss"] == pytest.approx(loss.item(), abs=1e-6)
    assert summary["accuracy"] == 1.0 and summary["lm_nll"] == pytest.approx(math.log(4), abs=1e-6)


def test_beta_rm_zero_skips_the_lm_term():
    loss, stats = rm_loss(FixedRewardModel([0.0, 1.0]), rm_batch(), {"examples": 1, "lm_tokens": 2}, 0.0)
    assert loss.item() == pytest.approx(1.313262, abs=1e-6) and "nll_sum" not in stats


def test_step_counts_split_the_loss_across_micro_batches():
    # The same batch as half of a two-element step contributes half its loss.
    loss, _ = rm_loss(FixedRewardModel([2.0, 0.0]), rm_batch(), {"examples": 2, "lm_tokens": 4}, 0.5)
    assert loss.item() == pytest.approx((0.126928 + 0.5 * math.log(4)) / 2, abs=1e-6)
