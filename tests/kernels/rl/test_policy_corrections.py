"""ppo_policy_loss's GSPO ratio, importance-sampling corrections, log-ratio clamp and the new
aggregations, and kl_penalty's clamps: hand-worked cases on every backend."""
import math

import pytest
import torch

from fusedrl.kernels import kl_penalty, ppo_policy_loss, use_backend
from fusedrl.kernels.rl import ppo_loss_ops
from kernel_testing import DEVICE, FUSED_BACKENDS, assert_close, needs_triton, rand_mask

pytestmark = needs_triton
BACKENDS = FUSED_BACKENDS + ["torch"]


def policy(log_ratios, adv, backend, mask=None, **kwargs):
    old = torch.full((1, len(log_ratios)), -1.0, device=DEVICE)
    logp = (old + torch.tensor([log_ratios], device=DEVICE)).requires_grad_()
    with use_backend(backend):
        loss, stats = ppo_policy_loss(logp, old, torch.tensor([adv], device=DEVICE), mask, **kwargs)
    loss.backward()
    return loss.item(), logp.grad[0].tolist(), stats


@pytest.mark.parametrize("backend", BACKENDS)
def test_gspo_uses_the_sequence_s_length_normalized_ratio(backend):
    # log-ratios ln 1.5 and ln 0.5: s = exp(mean) = sqrt(0.75) = 0.8660, inside [0.8, 1.2].
    # A = 1, seq-mean-token-mean: loss = -s; d loss / d logp_t = -s / 2 (GSPO: s / |y| per token).
    s = math.sqrt(0.75)
    loss, grad, stats = policy([math.log(1.5), math.log(0.5)], [1.0, 1.0], backend,
                               ratio_level="sequence", agg="seq-mean-token-mean")
    assert loss == pytest.approx(-s, abs=1e-6)
    assert grad == pytest.approx([-s / 2, -s / 2], abs=1e-6)
    assert stats["ratio_mean"].item() == pytest.approx(s, abs=1e-6)
    # s = 2 is clipped per sequence at 1.2 for A > 0: loss -1.2, no gradient.
    loss, grad, stats = policy([math.log(2.0), math.log(2.0)], [1.0, 1.0], backend, ratio_level="sequence")
    assert loss == pytest.approx(-1.2, abs=1e-6) and grad == [0.0, 0.0] and stats["clipfrac"].item() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_importance_sampling(backend):
    # ratio 1 (logp = old); w = pi_old / pi_rollout = 3 and 0.5; cap 2 -> weights 2 and 0.5.
    # token-mean of -A w r = (-2 - 0.5) / 2; gradients -w / 2. Stats over raw weights: mean 1.75, max 3.
    old = torch.full((1, 2), -1.0, device=DEVICE)
    rollout = old - torch.tensor([[math.log(3.0), math.log(0.5)]], device=DEVICE)
    loss, grad, stats = policy([0.0, 0.0], [1.0, 1.0], backend, rollout_logprobs=rollout, is_mode="tis", is_cap=2.0)
    assert loss == pytest.approx(-1.25, abs=1e-6) and grad == pytest.approx([-1.0, -0.25], abs=1e-6)
    assert stats["is_weight_mean"].item() == pytest.approx(1.75, abs=1e-5)
    assert stats["is_weight_max"].item() == pytest.approx(3.0, abs=1e-5)
    # sequence level: w = 3 * 0.5 = 1.5 < cap on both tokens: loss -1.5
    loss, _, _ = policy([0.0, 0.0], [1.0, 1.0], backend, rollout_logprobs=rollout, is_mode="tis", is_level="sequence")
    assert loss == pytest.approx(-1.5, abs=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_importance_sampling_drops_tokens_outside_the_band(backend):
    # w = 3 (outside [0.5, 2]: dropped, also from the token-mean count) and 0.5 (kept, weight 1).
    old = torch.full((1, 2), -1.0, device=DEVICE)
    rollout = old - torch.tensor([[math.log(3.0), math.log(0.5)]], device=DEVICE)
    loss, grad, stats = policy([0.0, 0.0], [1.0, 1.0], backend, rollout_logprobs=rollout, is_mode="mis",
                               is_low=0.5, is_high=2.0)
    assert loss == pytest.approx(-1.0, abs=1e-6) and grad == pytest.approx([0.0, -1.0], abs=1e-6)
    assert stats["is_masked_frac"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_ratio_is_clamped_before_exp(backend):
    # logp - old = 2 clamped to 1: r = e; A = -1: max(e, 1.2) = e, and no gradient (clamped).
    loss, grad, _ = policy([2.0], [-1.0], backend, log_ratio_clamp=1.0)
    assert loss == pytest.approx(math.e, abs=1e-5) and grad == [0.0]
    loss, grad, _ = policy([0.5], [-1.0], backend, log_ratio_clamp=1.0)    # inside the clamp
    assert loss == pytest.approx(math.exp(0.5), abs=1e-5) and grad == pytest.approx([math.exp(0.5)], abs=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_aggregations(backend):
    # Two rows, per-token losses -A r with r = 1: row 0 has 2 valid tokens, row 1 one (T = 3).
    old = torch.full((2, 3), -1.0, device=DEVICE)
    logp = old.clone().requires_grad_()
    adv = torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]], device=DEVICE)
    mask = torch.tensor([[True, True, False], [True, False, False]], device=DEVICE)
    with use_backend(backend):
        total, _ = ppo_policy_loss(logp, old, adv, mask, agg="token-sum")          # -(1 + 2 + 4)
        normed, _ = ppo_policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum-norm")   # / T = 3
        custom, _ = ppo_policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum-norm", loss_agg_norm=7.0)
    assert total.item() == pytest.approx(-7.0) and normed.item() == pytest.approx(-7.0 / 3)
    assert custom.item() == pytest.approx(-1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_clamps(backend):
    # k3 with ref - logp = 3 (clamped to 1: e - 2, gradient 0) and 0.5 (e^0.5 - 1.5, gradient 1 - e^0.5).
    logp = torch.zeros(2, device=DEVICE, requires_grad=True)
    ref = torch.tensor([3.0, 0.5], device=DEVICE)
    with use_backend(backend):
        kl = kl_penalty(logp, ref, estimator="k3", log_ratio_clamp=1.0)
    kl.sum().backward()
    assert_close(kl, torch.tensor([math.e - 2, math.exp(0.5) - 1.5]), atol=1e-6, rtol=1e-6)
    assert logp.grad.tolist() == pytest.approx([0.0, 1 - math.exp(0.5)], abs=1e-6)
    with use_backend(backend):
        capped = kl_penalty(torch.zeros(2, device=DEVICE), ref, estimator="k3", clamp=0.5)
    assert capped.tolist() == pytest.approx([0.5, math.exp(0.5) - 1.5], abs=1e-6)


def test_bad_corrections_are_named():
    x = torch.zeros(1, 2, device=DEVICE)
    with pytest.raises(ValueError, match="needs rollout_logprobs"):
        ppo_policy_loss(x, x, x, None, is_mode="tis")
    with pytest.raises(ValueError, match="is_mode"):
        ppo_policy_loss(x, x, x, None, is_mode="clip", rollout_logprobs=x)
    with pytest.raises(ValueError, match="ratio_level"):
        ppo_policy_loss(x, x, x, None, ratio_level="group")


CORRECTED_MODES = {
    "gspo": dict(ratio_level="sequence"),
    "tis-token": dict(is_mode="tis", is_cap=1.5),
    "tis-sequence": dict(is_mode="tis", is_level="sequence"),
    "mis-token": dict(is_mode="mis", is_low=0.7, is_high=1.4),
    "mis-sequence": dict(is_mode="mis", is_level="sequence", is_low=0.8, is_high=1.25),
    "gspo-mis-token": dict(ratio_level="sequence", is_mode="mis", is_low=0.7, is_high=1.4),
    "gspo-tis-sequence": dict(ratio_level="sequence", is_mode="tis", is_level="sequence", dual_clip=2.0),
}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# blocks_per_program 1: rows of 1500 tokens split over two programs where no mode needs whole rows
# (rows of one block launch the same programs either way).
@pytest.mark.parametrize("shape, blocks_per_program", [((1, 1), 4), ((5, 37), 4), ((3, 1500), 4), ((3, 1500), 1)])
@pytest.mark.parametrize("mode", CORRECTED_MODES)
def test_corrected_modes_match_the_float64_composition(mode, shape, blocks_per_program, dtype, agg, fused_backend,
                                                       monkeypatch):
    monkeypatch.setattr(ppo_loss_ops, "MAX_CHUNK_BLOCKS", blocks_per_program)
    kwargs = CORRECTED_MODES[mode]
    old = (torch.randn(shape, device=DEVICE) * 0.5 - 2).to(dtype)
    logp = (old.float() + torch.randn(shape, device=DEVICE) * 0.3).to(dtype)
    adv = torch.randn(shape, device=DEVICE).to(dtype)
    # sampler log-probs near old_logp: token weights around the band's edges; a sequence's product
    # of T weights spread about as widely
    noise = 0.3 if kwargs.get("is_level") != "sequence" else 0.3 / shape[-1] ** 0.5
    rollout = (old.float() + noise * torch.randn(shape, device=DEVICE)).to(dtype)
    mask = rand_mask(*shape)
    if shape[0] > 2:
        mask[1] = False                                                       # an empty row
    x = logp.clone().requires_grad_()
    with use_backend(fused_backend):
        loss, stats = ppo_policy_loss(x, old, adv, mask, agg=agg, rollout_logprobs=rollout, **kwargs)
    loss.backward()
    x64 = logp.double().requires_grad_()
    with use_backend("torch"):
        ref_loss, ref_stats = ppo_policy_loss(x64, old.double(), adv.double(), mask, agg=agg,
                                              rollout_logprobs=rollout.double(), **kwargs)
    ref_loss.backward()
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    tol = dict(atol=1e-7, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-7, rtol=2.0**-7)
    assert_close(x.grad, x64.grad, name="grad", **tol)
    assert set(stats) == set(ref_stats)
    for name, value in stats.items():
        assert value.dim() == 0 and not value.requires_grad
        assert_close(value, ref_stats[name], atol=1e-6, rtol=1e-5, name=name)
