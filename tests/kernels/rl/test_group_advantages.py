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


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_invalid_responses_leave_their_group(estimator):
    # A group with a response that is no sample (NaN score) equals the group without it.
    g = torch.Generator().manual_seed(5)
    kept = torch.randn(3, 3, generator=g)
    scores = torch.cat([kept[:, :1], torch.full((3, 1), float("nan")), kept[:, 1:]], dim=1)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[:, 1] = False
    got = group_advantages(scores, estimator=estimator, valid=valid)
    assert (got[:, 1] == 0).all()
    torch.testing.assert_close(got[:, [0, 2, 3]], group_advantages(kept, estimator=estimator))
    # One valid response left: nothing to compare it with.
    lone = torch.tensor([[True, False, False, False]] * 3)
    assert group_advantages(scores, estimator=estimator, valid=lone).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="valid must be bool"):
        group_advantages(kept, estimator=estimator, valid=valid)


@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp_baseline"])
def test_compiles_without_graph_breaks(estimator):
    """The finite-scores check reads values: it runs only where dispatch.sync_checks_enabled (not
    while torch.compile traces, where its branch would break the graph)."""
    torch._dynamo.reset()
    scores = torch.randn(3, 4)
    valid = torch.rand(3, 4) > 0.2
    compiled = torch.compile(lambda s, v: group_advantages(s, estimator=estimator, valid=v), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(scores, valid), group_advantages(scores, estimator=estimator, valid=valid))


def test_a_valid_mask_on_another_device_is_named():
    with pytest.raises(ValueError, match="group_advantages: valid is on meta but scores is on cpu"):
        group_advantages(torch.ones(2, 3), estimator="grpo", valid=torch.ones(2, 3, dtype=torch.bool, device="meta"))
