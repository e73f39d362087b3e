"""verl's seams on our kernels against verl's definitions (verl_definitions.py; verl itself is
tested where it imports: register() then installs into its registries)."""
import importlib.util

import pytest
import torch

from fusedrl.kernels import linear_token_logprobs
from fusedrl.kernels.integrations import verl as ours
from verl_definitions import gae_advantage_return, grpo_outcome, policy_loss_vanilla

B, T = 5, 7


class ActorConfig(dict):
    """The fields of verl's ActorConfig its vanilla loss reads (attributes and .get)."""
    __getattr__ = dict.get


def rollout(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logp = (torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3 - 1).requires_grad_()
    old = logp.detach() + 0.8 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 4:] = 0
    mask[4, :] = 0
    return logp, old, torch.randn(B, T, generator=gen, dtype=torch.float64), mask, gen


@pytest.mark.parametrize("mode, batch_info", [
    ("token-mean", {}), ("token-mean", dict(dp_size=2, batch_num_tokens=40)),
    ("token-sum", dict(dp_size=2)), ("seq-mean-token-sum", dict(dp_size=2, global_batch_size=9)),
    ("seq-mean-token-sum-norm", {}), ("seq-mean-token-sum-norm", dict(loss_scale_factor=3)),
    ("seq-mean-token-mean", {}), ("seq-mean-token-mean", dict(dp_size=4, global_batch_size=10)),
])
def test_policy_loss_is_verls_vanilla(mode, batch_info):
    logp, old, adv, mask, gen = rollout()
    is_weights = torch.rand(B, T, generator=gen, dtype=torch.float64) + 0.5
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28,
                         clip_ratio_c=2.0, global_batch_info=batch_info)
    loss, metrics = ours.compute_policy_loss_fusedrl(old, logp, adv, mask, mode, config, is_weights)
    (grad,) = torch.autograd.grad(loss, logp)
    theirs, clipfrac, ppo_kl, lower = policy_loss_vanilla(old, logp, adv, mask, mode, 0.15, 0.28,
                                                          2.0, is_weights, **batch_info)
    (their_grad,) = torch.autograd.grad(theirs, logp)
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
    assert (grad - their_grad).abs().max() < 1e-6
    assert metrics["actor/pg_clipfrac"] == pytest.approx(clipfrac.item(), abs=1e-6)
    assert metrics["actor/ppo_kl"] == pytest.approx(ppo_kl.item(), abs=1e-6)
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(lower.item(), abs=1e-6)
    assert 0 < clipfrac < 1 and 0 < lower < 1


def test_advantage_estimators_are_verls():
    _, _, rewards, mask, gen = rollout(1)
    mask[4, :3] = 1
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    advantages, returns = ours.compute_gae_advantage_return_fusedrl(rewards, values, mask, 0.99,
                                                                   0.95)
    their_advantages, their_returns = gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    valid = mask != 0
    assert torch.allclose(advantages[valid].double(), their_advantages[valid], atol=1e-5)
    assert torch.allclose(returns[valid].double(), their_returns[valid], atol=1e-5)
    index = ["p", "q", "p", "r", "q"]
    spread, _ = ours.compute_grpo_outcome_advantage_fusedrl(rewards, mask, index)
    expected = grpo_outcome(rewards.sum(-1), index)[:, None] * mask
    assert torch.allclose(spread.double(), expected, atol=1e-5)


def test_linear_cross_entropy_has_verls_shape():
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(2, 3, 8, generator=gen), torch.randn(30, 8, generator=gen)
    labels = torch.randint(0, 30, (2, 3), generator=gen)
    logp, entropy = ours.linear_cross_entropy(hidden, weight, labels, 0.7, "none")
    assert logp.shape == entropy.shape == (2, 3)
    assert torch.equal(logp, linear_token_logprobs(hidden, weight, labels, temperature=0.7))
    total, _ = ours.linear_cross_entropy(hidden, weight, labels, 0.7, "sum")
    assert total.item() == pytest.approx(logp.sum().item())


@pytest.mark.skipif(importlib.util.find_spec("verl") is not None, reason="verl is installed")
def test_register_without_verl_says_so():
    with pytest.raises(ImportError, match=r"register\(\): verl is not importable here"):
        ours.register()


@pytest.mark.skipif(importlib.util.find_spec("verl") is None,
                    reason="verl is not installed (its pins exclude this transformers)")
def test_register_installs_into_verls_registries():
    from verl.trainer.ppo import core_algos
    from verl.utils.kernel import linear_cross_entropy
    ours.register()
    ours.register()
    assert core_algos.get_policy_loss_fn("fusedrl") is ours.compute_policy_loss_fusedrl
    assert core_algos.get_adv_estimator_fn("fusedrl_grpo") is \
        ours.compute_grpo_outcome_advantage_fusedrl
    assert linear_cross_entropy.linear_cross_entropy is ours.linear_cross_entropy
