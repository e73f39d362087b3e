"""Reward-model loss on hand-computed cases: pairwise, K-way (all K-choose-2 pairs), beta_rm."""
import math

import pytest
import torch
from torch import nn

from fusedrl.engine.data.packing import pack_sequences
from fusedrl.engine.stages.rm import pair_indices, ranking_loss_sum
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
    assert [p.tolist() for p in pair_indices(4)] == [[0, 0, 0, 1, 1, 2], [1, 2, 3, 2, 3, 3]]


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
