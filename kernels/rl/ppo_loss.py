"""PPO's clipped policy and value losses: argument checks and backend choice (host functions).

The loss is a weighted sum of per-token terms, with the row weights of statistics.py (the rules of
every `agg`, written once).
Each kernel computes, per token, the term, its derivative and the diagnostics (clip fractions, k3
KL, ratio mean/max); the stats stay on the device (no host sync).

Backends: "triton" runs every mode (GSPO's sequence ratio, TIS/MIS at token or sequence level, every
aggregation) in three launches per forward + backward, with the row weights and stats finalized on
the device (ppo_loss_ops.py, ppo_loss_kernels.py); "cuda" (csrc/ppo_loss.cu) runs the plain mode,
taking the row weights of aggregation.py as an input, and leaves the corrections to Triton; "torch"
is the reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks, cuda_ext, reference
from ..dispatch import backend_for
from .ppo_loss_ops import IS_MODE_IDS, policy_loss_op, value_loss_op
from .statistics import (AGGS, check_is_options, clip_fractions, importance_weights, row_weights,
                         sequence_ratio_logp)

POLICY_STATS = ("clipfrac", "dual_clipfrac", "approx_kl", "ratio_mean", "ratio_max")
IS_STATS = ("is_weight_mean", "is_weight_max", "is_masked_frac")


# Fake implementations and autograd of the C++ twins fusedrl::cuda_ppo_policy_loss(logp, old_logp,
# advantages, mask, weights [rows] from row_weights, clip_low, clip_high, dual_clip (<= 0: off),
# log_ratio_clamp, compute_grad) and fusedrl::cuda_ppo_value_loss(values, old_values, returns, mask,
# weights, clip_eps (< 0: off), compute_grad), each returning (loss [], d loss / d x [...] fp32 or
# [0], stats [5] / [1]).


def _policy_fake(logp, old_logp, advantages, mask, weights, clip_low, clip_high, dual_clip,
                 log_ratio_clamp, compute_grad):
    grad = torch.empty(logp.shape if compute_grad else (0,), dtype=torch.float32,
                       device=logp.device)
    return logp.new_empty((), dtype=torch.float32), grad, logp.new_empty(5, dtype=torch.float32)


def _value_fake(values, old_values, returns, mask, weights, clip_eps, compute_grad):
    grad = torch.empty(values.shape if compute_grad else (0,), dtype=torch.float32,
                       device=values.device)
    return values.new_empty((), dtype=torch.float32), grad, values.new_empty(1, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.input_dtype, ctx.n_inputs = inputs[0].dtype, len(inputs)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_grad, _grad_stats):
    """The per-token derivative was computed in forward: scale it by the upstream scalar."""
    (grad,) = ctx.saved_tensors
    return ((grad_loss * grad).to(ctx.input_dtype),) + (None,) * (ctx.n_inputs - 1)


def register_cuda_rules() -> None:
    """Fake implementations and autograd of the C++ twins fusedrl::cuda_ppo_*_loss."""
    for name, fake in (("ppo_policy_loss", _policy_fake), ("ppo_value_loss", _value_fake)):
        torch.library.register_fake(f"fusedrl::cuda_{name}", fake)
        torch.library.register_autograd(f"fusedrl::cuda_{name}", _backward,
                                        setup_context=_setup_context)


cuda_ext.on_load(register_cuda_rules)


def token_advantages(op: str, advantages: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """advantages as [..., T]: a host's per-sequence [...] or [..., 1] (TRL's [B, 1]) spread over
    logp's tokens; any other shape is refused (no silent broadcasting)."""
    checks.check_tensor(op, "advantages", advantages)
    lead = logp.shape[:-1]
    if advantages.shape == logp.shape:
        return advantages
    if logp.dim() >= 1 and advantages.shape in (lead, lead + (1,)):
        return advantages.reshape(lead + (1,)).expand(logp.shape)
    raise ValueError(f"{op}: advantages must have shape {tuple(logp.shape)}, {tuple(lead)} or "
                     f"{tuple(lead) + (1,)} (logp's), got {tuple(advantages.shape)}")


def _check_loss_inputs(op: str, names: tuple[str, str, str], tensors, mask, agg: str):
    """Checks shared by both losses (shapes, dtypes, choices: no tensor value is read); the mask as
    the ops take it (checks.mask_arg)."""
    first = tensors[0]
    for name, tensor in zip(names, tensors):
        checks.check_float(op, name, tensor)
        checks.check_same_shape(op, name, tensor, names[0], first)
    if first.dim() < 1:
        raise ValueError(f"{op}: {names[0]} must have shape [..., T], got a 0-dim tensor")
    checks.check_choice(op, "agg", agg, AGGS)
    return checks.mask_arg(op, mask, names[0], first)


def _all_valid(x: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(x, dtype=torch.bool)


def _wants_grad(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: Optional[torch.Tensor], *, clip_eps: float = 0.2,
                    clip_eps_high: Optional[float] = None, dual_clip: Optional[float] = None,
                    agg: str = "token-mean", loss_agg_norm: Optional[float] = None,
                    ratio_level: str = "token", log_ratio_clamp: float = 20.0,
                    rollout_logprobs: Optional[torch.Tensor] = None, is_mode: Optional[str] = None,
                    is_level: str = "token", is_cap: float = 2.0, is_low: float = 0.5,
                    is_high: float = 2.0, clip_sides: bool = False):
    """PPO-clip policy loss: aggregate of max(-A r, -A clip(r, 1 - eps, 1 + eps_high)).

    Args:
        logp: [..., T] log-probs under the policy being trained (requires grad).
        old_logp: [..., T] log-probs at rollout time. advantages: [..., T], or one per sequence
            ([...] or [..., 1]). Both are constants.
        mask: [..., T] bool/integer/float, nonzero = valid (None: all valid).
        clip_eps / clip_eps_high: the ratio range is [1 - clip_eps, 1 + clip_eps_high]
            (clip_eps_high defaults to clip_eps; a larger one is "clip-higher").
        dual_clip: c > 1; for A < 0 the loss is bounded by -A * c (dual-clip PPO).
        agg: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum" or
            "seq-mean-token-sum-norm" (the token sum / loss_agg_norm, default T; see the module
            docstring).
        ratio_level: "token" (PPO) or "sequence" (GSPO: each sequence's length-normalized ratio,
            clipped per sequence; see statistics.py).
        log_ratio_clamp: logp - old_logp is clamped to +-this before exp() (gradient 0 beyond).
        rollout_logprobs: [..., T] the sampler's log-probs; with is_mode "tis" (truncated) or
            "mis" (masked, the [is_low, is_high] band) at is_level "token" or "sequence", the
            importance-sampling correction of pi_old / pi_rollout (statistics.py).
        clip_sides: also the two sides of the clip fraction, clipfrac_low and clipfrac_high
            (statistics.clip_fractions: a few elementwise launches more).
    Returns:
        (loss [] fp32, stats) with stats of detached 0-dim fp32 tensors: clipfrac, dual_clipfrac,
        approx_kl (k3 estimate of KL(old || new) of the ratio used), ratio_mean, ratio_max (over
        valid tokens), with is_mode: is_weight_mean, is_weight_max, is_masked_frac, and with
        clip_sides: clipfrac_low, clipfrac_high.
    """
    op = "ppo_policy_loss"
    checks.check_tensor(op, "logp", logp)
    advantages = token_advantages(op, advantages, logp)
    mask = _check_loss_inputs(op, ("logp", "old_logp", "advantages"), (logp, old_logp, advantages),
                              mask, agg)
    loss, stats = _policy_loss(op, logp, old_logp, advantages, mask, clip_eps, clip_eps_high,
                               dual_clip, agg, loss_agg_norm, ratio_level, log_ratio_clamp,
                               rollout_logprobs, is_mode, is_level, is_cap, is_low, is_high)
    if clip_sides:
        eps_high = clip_eps if clip_eps_high is None else clip_eps_high
        ratio_logp = logp
        if ratio_level == "sequence":
            valid = _all_valid(logp) if mask is None else mask
            ratio_logp = sequence_ratio_logp(logp, old_logp, valid)
        log_ratio = (ratio_logp.detach().float() - old_logp.float()).clamp(-log_ratio_clamp,
                                                                          log_ratio_clamp)
        stats.update(clip_fractions(log_ratio, advantages, mask, clip_eps, eps_high))
    return loss, stats


def _policy_loss(op, logp, old_logp, advantages, mask, clip_eps, clip_eps_high, dual_clip, agg,
                 loss_agg_norm, ratio_level, log_ratio_clamp, rollout_logprobs, is_mode, is_level,
                 is_cap, is_low, is_high):
    """ppo_policy_loss past the shape checks: the options checked, the backend chosen, run."""
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    checks.check_positive(op, "clip_eps", clip_eps)
    checks.check_positive(op, "clip_eps_high", eps_high)
    checks.check_positive(op, "log_ratio_clamp", log_ratio_clamp)
    checks.check_choice(op, "ratio_level", ratio_level, ("token", "sequence"))
    if loss_agg_norm is not None:
        checks.check_positive(op, "loss_agg_norm", loss_agg_norm)
    if dual_clip is not None and not (isinstance(dual_clip, (int, float)) and dual_clip > 1):
        raise ValueError(f"{op}: dual_clip must be a number > 1 or None, got {dual_clip!r}")
    old_logp, advantages = old_logp.detach(), advantages.detach()
    if is_mode is not None:
        check_is_options(op, is_mode, is_level, is_cap, is_low, is_high, prefix="is_")
        if rollout_logprobs is None:
            raise ValueError(
                f"{op}: is_mode={is_mode!r} needs rollout_logprobs (the sampler's log-probs)")
        checks.check_float(op, "rollout_logprobs", rollout_logprobs)
        checks.check_same_shape(op, "rollout_logprobs", rollout_logprobs, "logp", logp)
        rollout_logprobs = rollout_logprobs.detach()
    # "auto"'s measurements and the C++ twin are of the plain mode: the corrections run on Triton.
    plain = is_mode is None and ratio_level == "token"
    backend = cuda_ext.twin_or_fallback(backend_for(logp, op if plain else None), logp, old_logp,
                                        advantages, supported=plain)
    if backend == "torch":
        mask = _all_valid(logp) if mask is None else mask
        is_stats = {}
        if is_mode is not None:
            scale, mask, is_stats = importance_weights(old_logp, rollout_logprobs, mask,
                                                       mode=is_mode, level=is_level, cap=is_cap,
                                                       low=is_low, high=is_high)
            if scale is not None:
                advantages = advantages.float() * scale
        if ratio_level == "sequence":
            logp, old_logp = sequence_ratio_logp(logp, old_logp, mask), old_logp.float()
        loss, stats = reference.ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps=clip_eps,
                                                clip_eps_high=eps_high, dual_clip=dual_clip,
                                                agg=agg, loss_agg_norm=loss_agg_norm,
                                                log_ratio_clamp=log_ratio_clamp)
        return loss, {**stats, **is_stats}
    wants_grad = _wants_grad(logp)
    if backend == "cuda":
        mask = _all_valid(logp) if mask is None else mask.contiguous()
        loss, _, stats = torch.ops.fusedrl.cuda_ppo_policy_loss(
            logp.contiguous(), old_logp.contiguous(), advantages.contiguous(), mask,
            row_weights(mask, agg, loss_agg_norm), float(clip_eps), float(eps_high),
            float(dual_clip or 0.0), float(log_ratio_clamp), wants_grad)
        return loss, dict(zip(POLICY_STATS, stats.unbind()))
    loss, stats, _, _ = policy_loss_op(
        logp.contiguous(), old_logp.contiguous(), advantages.contiguous(),
        None if mask is None else mask.contiguous(),
        None if is_mode is None else rollout_logprobs.contiguous(), AGGS.index(agg),
        float(loss_agg_norm or logp.shape[-1]), float(clip_eps), float(eps_high),
        float(dual_clip or 0.0), float(log_ratio_clamp), IS_MODE_IDS[is_mode],
        is_level == "sequence", float(is_cap), float(is_low), float(is_high),
        ratio_level == "sequence", wants_grad)
    names = POLICY_STATS + (IS_STATS if is_mode is not None else ())
    return loss, dict(zip(names, stats.unbind()))


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: Optional[torch.Tensor], *, clip_eps: Optional[float] = 0.2,
                   agg: str = "token-mean", loss_agg_norm: Optional[float] = None):
    """Clipped value loss: aggregate of 0.5 * max((v - R)^2, (clip(v, v_old +- eps) - R)^2).

    Args:
        values: [..., T] critic outputs (requires grad). old_values, returns: [..., T] constants.
        mask: [..., T] bool/integer/float (None: all valid). clip_eps: None disables clipping.
        agg, loss_agg_norm: as in ppo_policy_loss.
    Returns:
        (loss [] fp32, {"vf_clipfrac": detached 0-dim fp32}).
    """
    op = "ppo_value_loss"
    mask = _check_loss_inputs(op, ("values", "old_values", "returns"),
                              (values, old_values, returns), mask, agg)
    if clip_eps is not None:
        checks.check_positive(op, "clip_eps", clip_eps)
    old_values, returns = old_values.detach(), returns.detach()
    backend = cuda_ext.twin_or_fallback(backend_for(values, op), values, old_values, returns)
    if backend == "torch":
        return reference.ppo_value_loss(values, old_values, returns, mask, clip_eps=clip_eps,
                                        agg=agg, loss_agg_norm=loss_agg_norm)
    wants_grad = _wants_grad(values)
    clip = -1.0 if clip_eps is None else float(clip_eps)
    if backend == "cuda":
        mask = _all_valid(values) if mask is None else mask.contiguous()
        loss, _, stats = torch.ops.fusedrl.cuda_ppo_value_loss(
            values.contiguous(), old_values.contiguous(), returns.contiguous(), mask,
            row_weights(mask, agg, loss_agg_norm), clip, wants_grad)
        return loss, {"vf_clipfrac": stats[0]}
    loss, stats, _, _ = value_loss_op(
        values.contiguous(), old_values.contiguous(), returns.contiguous(),
        None if mask is None else mask.contiguous(), AGGS.index(agg),
        float(loss_agg_norm or values.shape[-1]), clip, wants_grad)
    return loss, {"vf_clipfrac": stats[0]}
