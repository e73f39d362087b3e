"""ppo_policy_loss / ppo_value_loss (fused Triton and CUDA kernels) against the reference and hand cases."""
import math

import pytest
import torch

from fusedrl.kernels import ppo_policy_loss, ppo_value_loss, reference, use_backend
from kernel_testing import DEVICE, FUSED_BACKENDS, ULP, assert_close, needs_triton, rand_mask

pytestmark = needs_triton
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["torch"])
def test_policy_hand_computed(backend):
    # clip_eps 0.2, token-mean over 4 tokens:
    #   A=+1, r=1.5: max(-1.5, -1.2) = -1.2 clipped (grad 0)
    #   A=+1, r=0.5: max(-0.5, -0.8) = -0.5          (grad -A r = -0.5)
    #   A=-1, r=1.5: max( 1.5,  1.2) =  1.5          (grad 1.5)
    #   A=-1, r=0.5: max( 0.5,  0.8) =  0.8 clipped (grad 0)
    # loss = (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15; grads / 4; clipfrac 2/4.
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5]], device=DEVICE)
    old = torch.full_like(ratios, -1.0)
    logp = (old + ratios.log()).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], device=DEVICE)
    with use_backend(backend):
        loss, stats = ppo_policy_loss(logp, old, adv, None, clip_eps=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    assert_close(logp.grad, torch.tensor([[0.0, -0.125, 0.375, 0.0]]), atol=1e-6, rtol=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["ratio_max"].item() == pytest.approx(1.5, abs=1e-6)
    # k3 of old vs new: r - 1 - log r, averaged.
    k3 = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.5, 0.5)) / 4
    assert stats["approx_kl"].item() == pytest.approx(k3, abs=1e-6)


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["torch"])
def test_dual_clip_hand_computed(backend):
    # A=-1, r=4: max(4, 1.2) = 4 > 3 = -A * c, so the dual clip bounds it at 3 (grad 0);
    # A=-1, r=2: max(2, 1.2) = 2 < 3, unchanged (grad -A r = 2). token-mean over 2.
    old = torch.zeros(1, 2, device=DEVICE)
    logp = torch.tensor([[math.log(4.0), math.log(2.0)]], device=DEVICE).requires_grad_()
    adv = torch.full((1, 2), -1.0, device=DEVICE)
    with use_backend(backend):
        loss, stats = ppo_policy_loss(logp, old, adv, None, dual_clip=3.0)
    loss.backward()
    assert loss.item() == pytest.approx((3 + 2) / 2, abs=1e-5)
    assert_close(logp.grad, torch.tensor([[0.0, 1.0]]), atol=1e-6, rtol=1e-6)
    assert stats["dual_clipfrac"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["torch"])
def test_value_hand_computed(backend):
    # eps 0.2, token-mean over 3:
    #   v=2.0, old=1, R=0: max(0.5*4, 0.5*1.2^2) = 2.0         grad v - R = 2
    #   v=0.5, old=1, R=2: max(0.5*2.25, 0.5*1.2^2) = 1.125    grad -1.5
    #   v=1.5, old=1, R=2: max(0.5*0.25, 0.5*0.8^2) = 0.32     clipped, grad 0
    values = torch.tensor([[2.0, 0.5, 1.5]], device=DEVICE, requires_grad=True)
    old = torch.ones(1, 3, device=DEVICE)
    returns = torch.tensor([[0.0, 2.0, 2.0]], device=DEVICE)
    with use_backend(backend):
        loss, stats = ppo_value_loss(values, old, returns, None, clip_eps=0.2)
    loss.backward()
    assert loss.item() == pytest.approx((2.0 + 1.125 + 0.32) / 3, abs=1e-6)
    assert_close(values.grad, torch.tensor([[2.0, -1.5, 0.0]]) / 3, atol=1e-6, rtol=1e-6)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)


def random_batch(shape, dtype):
    old = (torch.randn(shape, device=DEVICE) * 0.5 - 2).to(dtype)
    logp = (old.float() + torch.randn(shape, device=DEVICE) * 0.3).to(dtype)
    mask = rand_mask(*shape)
    if shape[0] > 2:
        mask[1] = False                                  # an empty row
    return logp, old, torch.randn(shape, device=DEVICE).to(dtype), mask


def check_grad(ours, exact, dtype, name):
    tol = dict(atol=1e-7, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-7, rtol=ULP[dtype])
    assert_close(ours, exact, name=name, **tol)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (3, 1500)])
@pytest.mark.parametrize("clip", [dict(), dict(clip_eps=0.1, clip_eps_high=0.28, dual_clip=2.0)])
def test_policy_matches_reference(clip, shape, dtype, agg, fused_backend):
    logp, old, adv, mask = random_batch(shape, dtype)
    x = logp.clone().requires_grad_()
    with use_backend(fused_backend):
        loss, stats = ppo_policy_loss(x, old, adv, mask, agg=agg, **clip)
    loss.backward()
    x64 = logp.double().requires_grad_()
    ref_loss, ref_stats = reference.ppo_policy_loss(x64, old.double(), adv.double(), mask, agg=agg, **clip)
    ref_loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    check_grad(x.grad, x64.grad, dtype, "grad")
    assert set(stats) == set(ref_stats)
    for name, value in stats.items():
        assert value.dim() == 0 and not value.requires_grad
        assert_close(value, ref_stats[name], atol=1e-6, rtol=1e-5, name=name)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clip_eps", [0.2, None])
def test_value_matches_reference(clip_eps, dtype, agg, fused_backend):
    values, old, returns, mask = random_batch((4, 29), dtype)
    x = values.clone().requires_grad_()
    with use_backend(fused_backend):
        loss, stats = ppo_value_loss(x, old, returns, mask, clip_eps=clip_eps, agg=agg)
    loss.backward()
    x64 = values.double().requires_grad_()
    ref_loss, ref_stats = reference.ppo_value_loss(x64, old.double(), returns.double(), mask,
                                                   clip_eps=clip_eps, agg=agg)
    ref_loss.backward()
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    check_grad(x.grad, x64.grad, dtype, "grad")
    assert_close(stats["vf_clipfrac"], ref_stats["vf_clipfrac"], atol=1e-7, rtol=0, name="vf_clipfrac")


@pytest.mark.parametrize("agg", AGGS)
def test_nothing_valid(agg, fused_backend):
    logp = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    none = torch.zeros(3, 4, dtype=torch.bool, device=DEVICE)
    with use_backend(fused_backend):
        loss, stats = ppo_policy_loss(logp, logp.detach() + 1, torch.randn(3, 4, device=DEVICE), none, agg=agg)
        vloss, vstats = ppo_value_loss(logp, logp.detach(), torch.randn(3, 4, device=DEVICE), none, agg=agg)
    (loss + vloss).backward()
    assert loss.item() == 0 and vloss.item() == 0 and torch.all(logp.grad == 0)
    assert all(v.item() == 0 for v in list(stats.values()) + list(vstats.values()))


def test_masked_garbage_is_ignored_and_no_grad_mode_works(fused_backend):
    logp, old, adv, mask = random_batch((4, 10), torch.float32)
    with use_backend(fused_backend), torch.no_grad():
        clean, _ = ppo_policy_loss(logp, old, adv, mask)
        dirty, _ = ppo_policy_loss(logp.masked_fill(~mask, float("nan")), old, adv.masked_fill(~mask, 1e30), mask)
    assert torch.equal(clean, dirty)


@pytest.mark.parametrize("bad, error, match", [
    (dict(agg="sum"), ValueError, "unknown agg 'sum'"),
    (dict(old_logp=torch.zeros(2, 4)), ValueError, r"old_logp must have the shape of logp \(2, 3\)"),
    (dict(mask=torch.ones(2, 3, dtype=torch.complex64)), TypeError, "mask must be bool, integer or float"),
    (dict(mask=torch.ones(2, dtype=torch.bool)), ValueError, "mask must have the shape of logp"),
    (dict(dual_clip=1.0), ValueError, "dual_clip must be a number > 1"),
    (dict(clip_eps=-0.1), ValueError, "clip_eps must be a positive number"),
    (dict(advantages=torch.zeros(2, 3, dtype=torch.long)), TypeError, "advantages must have dtype"),
])
def test_policy_bad_input(bad, error, match):
    args = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), advantages=torch.zeros(2, 3), mask=None)
    args.update(bad)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        ppo_policy_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), args.pop("mask"), **args)


def test_value_bad_input():
    v = torch.zeros(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"returns must have the shape of values \(2, 3\)"):
        ppo_value_loss(v, v, torch.zeros(3, 2, device=DEVICE), None)
    with pytest.raises(ValueError, match="unknown agg 'mean'"):
        ppo_value_loss(v, v, v, None, agg="mean")
