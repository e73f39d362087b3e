"""group_advantages: hand-worked cases of every estimator, and its input checks."""
import math

import pytest
import torch

from fusedrl.kernels import group_advantages


def test_hand_worked_estimators():
    scores = torch.tensor([[1.0, 0.0, 0.5]])
    # mean 0.5; unbiased std sqrt((0.25 + 0.25 + 0) / 2) = 0.5
    torch.testing.assert_close(group_advantages(scores, estimator="grpo", eps=0.0), torch.tensor([[1.0, -1.0, 0.0]]))
    torch.testing.assert_close(group_advantages(scores, estimator="dr_grpo"), torch.tensor([[0.5, -0.5, 0.0]]))
    # leave-one-out: 1 - (0 + 0.5) / 2 = 0.75, 0 - (1 + 0.5) / 2 = -0.75, 0.5 - (1 + 0) / 2 = 0
    torch.testing.assert_close(group_advantages(scores, estimator="rloo"), torch.tensor([[0.75, -0.75, 0.0]]))
    # group-centred [[.5, -.5, 0], [0, 0, 0]], whitened over the batch: unbiased std sqrt(0.5 / 5)
    two = torch.tensor([[1.0, 0.0, 0.5], [2.0, 2.0, 2.0]])
    z = 0.5 / math.sqrt(0.1)
    torch.testing.assert_close(group_advantages(two, estimator="reinforce_pp_baseline", eps=0.0),
                               torch.tensor([[z, -z, 0.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_equal_scores_give_zero_advantage(estimator):
    assert group_advantages(torch.full((3, 4), 2.5), estimator=estimator).abs().max().item() == 0.0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="n >= 2"):
        group_advantages(torch.ones(4, 1), estimator="grpo")
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([[1.0, float("nan")]]), estimator="grpo")
    with pytest.raises(ValueError, match="unknown estimator 'ppo'"):
        group_advantages(torch.ones(2, 2), estimator="ppo")
