"""The math from scores to advantages of a PPO iteration, on hand-made tensors."""
import math

import pytest
import torch

from fusedrl.engine.stages.ppo.advantages import (KLController, RunningMoments, advantages_and_returns,
                             last_valid_index, shape_rewards)
from fusedrl.engine.config.estimators import AGGREGATIONS, CRITIC_ESTIMATORS, ESTIMATORS, GROUP_ESTIMATORS
from fusedrl.engine.config.ppo import UpdateConfig
from fusedrl.engine.parallel import distributed
from fusedrl import kernels
from fusedrl.kernels import explained_variance, masked_whiten, reference


def test_shape_rewards_hand_computed():
    # Row 0: valid at 1..3, score 2 lands on t=3. Row 1: valid at 0 and 2 (a hole), score -1 on
    # t=2. Row 2: nothing valid, no reward anywhere. beta = 0.5.
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    kl = torch.tensor([[9.0, 0.2, 0.4, -0.2, 9.0], [1.0, 9.0, 0.0, 9.0, 9.0], [9.0] * 5])
    rewards = shape_rewards(torch.where(mask, kl, 0.0), torch.tensor([2.0, -1.0, 5.0]), mask, 0.5)
    expected = torch.tensor([[0.0, -0.1, -0.2, 0.1 + 2.0, 0.0],
                             [-0.5, 0.0, 0.0 - 1.0, 0.0, 0.0],
                             [0.0] * 5])
    torch.testing.assert_close(rewards, expected)
    assert last_valid_index(mask).tolist() == [3, 2, 0]


def test_shape_rewards_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"scores \[R\]"):
        shape_rewards(torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3, dtype=torch.bool), 0.1)


def test_reinforce_is_reward_to_go_minus_baseline():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.1, 0.3, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    advantages, returns = advantages_and_returns(rewards, values, mask, estimator="reinforce",
                                                 gamma=0.5, whiten=False)
    # G = [1 + 0.5 * 0 + 0.25 * 2, 0 + 0.5 * 2, 2] = [1.5, 1.0, 2.0]; A = G - V.
    torch.testing.assert_close(returns, torch.tensor([[1.5, 1.0, 2.0, 0.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[1.0, 0.9, 1.7, 0.0]]))


def test_gae_path_whitens_advantages_only():
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.rand(3, 6) > 0.3
    advantages, returns = advantages_and_returns(rewards, values, mask, gamma=0.9, lam=0.8)
    ref_adv, ref_ret = reference.gae(rewards.double(), values.double(), mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(returns.double(), ref_ret, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(advantages.double(), reference.masked_whiten(ref_adv, mask), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown estimator 'vtrace'"):
        advantages_and_returns(rewards, values, mask, estimator="vtrace")


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    assert float(explained_variance(returns, returns, mask)) == pytest.approx(1.0)
    assert float(explained_variance(torch.full_like(returns, 2.0), returns, mask)) == pytest.approx(0.0)
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), mask))


def test_one_process_whitening_is_the_kernels():
    # One process sums over no ranks: masked_whiten keeps its single-device path.
    assert distributed.data_parallel_sum() is None
    x, mask = torch.randn(3, 5), torch.rand(3, 5) > 0.3
    torch.testing.assert_close(masked_whiten(x, mask, sum_over=distributed.data_parallel_sum()),
                               reference.masked_whiten(x, mask))


def test_the_registry_is_what_the_config_and_the_kernels_accept():
    # One registry: the config's choices, the kernels' group estimators and aggregation rules (in
    # their order: the loss kernel takes an aggregation's index).
    from typing import get_type_hints
    hints = get_type_hints(UpdateConfig)
    assert hints["estimator"].__args__ == tuple(ESTIMATORS)
    assert hints["agg"].__args__ == tuple(AGGREGATIONS) == kernels.AGGS
    assert GROUP_ESTIMATORS == kernels.GROUP_ESTIMATORS
    assert sorted(CRITIC_ESTIMATORS + GROUP_ESTIMATORS) == sorted(ESTIMATORS)


def test_kl_controller_moves_toward_target():
    fixed = KLController(0.1)
    assert fixed.update(5.0, 64) == 0.1
    adaptive = KLController(0.1, target=1.0, horizon=100)
    assert adaptive.update(2.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))   # error clipped at +0.2
    before = adaptive.value
    assert adaptive.update(0.9, 10) == pytest.approx(before * (1 - 0.1 * 10 / 100))
    assert adaptive.update(float("nan"), 10) == pytest.approx(before * (1 - 0.1 * 10 / 100))
    with pytest.raises(ValueError, match="target must be > 0"):
        KLController(0.1, target=0.0)
    with pytest.raises(ValueError, match="value must be a finite number"):
        KLController(-1.0)


def test_running_moments_match_the_whole_stream():
    moments = RunningMoments()
    chunks = [torch.randn(n) * 3 + 1 for n in (5, 1, 17, 0, 8)]
    for chunk in chunks:
        moments.update(chunk)
    everything = torch.cat(chunks).double()
    assert moments.count == everything.numel()
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.std == pytest.approx(everything.std(unbiased=False).item())
    clipped = RunningMoments(clip=1.0).normalize(torch.tensor([0.0, 0.0, 10.0]))
    assert clipped.abs().max().item() == pytest.approx(1.0)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.std == moments.std and not math.isnan(restored.mean)
