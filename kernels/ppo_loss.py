"""PPO's clipped policy and value losses, forward and backward in one pass.

The loss is a weighted sum of per-token terms, so each kernel computes, per token, the term, its
derivative (pre-multiplied by the token's aggregation weight) and the diagnostics (clip fractions,
k3 KL, ratio mean/max), and writes one row of partial sums per block. Backward is then a single
multiply by the upstream scalar gradient. The stats stay on device (no host sync).

Aggregation weights: with n_b valid tokens in row b, N valid tokens, S non-empty rows and a
constant norm (default T, the padded length, as verl's loss_scale_factor),
    token-mean                w = 1 / N
    seq-mean-token-mean       w = 1 / (S * n_b)
    seq-mean-token-sum        w = 1 / S
    token-sum                 w = 1
    seq-mean-token-sum-norm   w = 1 / norm      (Dr. GRPO: the sum over all tokens / a constant)
Rows with no valid token are left out of every mean; with no valid token at all the loss is 0.

The token streams are loaded under the index-range mask and validity is applied with a select, so
the loads vectorize (a data-dependent load mask forces 32-bit accesses).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import checks, reference
from .dispatch import backend_for, fused_op, kernel_inputs
from .policy_corrections import IS_LEVELS, IS_MODES, importance_weights, sequence_ratio_logp
from .triton_compat import tl, triton

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum", "seq-mean-token-sum-norm")
BLOCK = 1024
# Partial-sum columns written by each block of a loss kernel.
N_PARTIALS = 6
LOSS, COUNT, CLIPPED, DUAL_CLIPPED, KL, RATIO_SUM = range(N_PARTIALS)


@triton.jit
def _store_partials(partials_ptr, loss, valid, clipped, dual_clipped, kl, ratio):
    """Write one block's partial sums (columns as in N_PARTIALS above)."""
    base = partials_ptr + tl.program_id(0) * 6
    tl.store(base + 0, tl.sum(loss, axis=0))
    tl.store(base + 1, tl.sum(valid.to(tl.float32), axis=0))
    tl.store(base + 2, tl.sum((clipped & valid).to(tl.float32), axis=0))
    tl.store(base + 3, tl.sum((dual_clipped & valid).to(tl.float32), axis=0))
    tl.store(base + 4, tl.sum(tl.where(valid, kl, 0.0), axis=0))
    tl.store(base + 5, tl.sum(tl.where(valid, ratio, 0.0), axis=0))


@triton.jit
def _load_token_block(x_ptr, y_ptr, z_ptr, mask_ptr, weights_ptr, n_elements, n_steps,
                      BLOCK_SIZE: tl.constexpr):
    """Offsets, validity, the row's aggregation weight and three fp32 inputs of one block (0 at
    invalid positions: loaded under the range mask, then selected, so the loads vectorize)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_range = offs < n_elements
    valid = in_range & (tl.load(mask_ptr + offs, mask=in_range, other=0) != 0)
    weight = tl.where(valid, tl.load(weights_ptr + offs // n_steps, mask=in_range, other=0.0), 0.0)
    x = tl.where(valid, tl.load(x_ptr + offs, mask=in_range, other=0.0).to(tl.float32), 0.0)
    y = tl.where(valid, tl.load(y_ptr + offs, mask=in_range, other=0.0).to(tl.float32), 0.0)
    z = tl.where(valid, tl.load(z_ptr + offs, mask=in_range, other=0.0).to(tl.float32), 0.0)
    return offs, in_range, valid, weight, x, y, z


@triton.jit
def _policy_loss_kernel(
    logp_ptr,         # [n] float, n = rows * T
    old_logp_ptr,     # [n] float
    adv_ptr,          # [n] float
    mask_ptr,         # [n] uint8/int, nonzero = valid
    weights_ptr,      # [rows] fp32 aggregation weight of each row's tokens
    grad_ptr,         # [n] fp32 out: d loss / d logp (written only if STORE_GRAD)
    partials_ptr,     # [n_blocks, 6] fp32 out
    ratio_max_ptr,    # [n_blocks] fp32 out: max ratio over the block's valid tokens (0 if none)
    n_elements,
    n_steps,          # T
    clip_low,         # ratio floor is 1 - clip_low
    clip_high,        # ratio ceiling is 1 + clip_high
    dual_clip,        # bound -A * dual_clip for A < 0 (used only if HAS_DUAL)
    log_ratio_clamp,  # logp - old_logp is clamped to +-log_ratio_clamp before exp()
    HAS_DUAL: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offs, in_range, valid, weight, logp, old_logp, adv = _load_token_block(
        logp_ptr, old_logp_ptr, adv_ptr, mask_ptr, weights_ptr, n_elements, n_steps, BLOCK_SIZE)
    raw_log_ratio = logp - old_logp
    log_ratio = tl.minimum(tl.maximum(raw_log_ratio, -log_ratio_clamp), log_ratio_clamp)
    ratio = tl.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    is_clipped = clipped > unclipped
    loss = tl.maximum(unclipped, clipped)
    # Where the clipped branch wins, clip() is flat (the ratio is outside the range), and where the
    # log-ratio is clamped the ratio is constant: gradient 0 in both.
    grad = tl.where(is_clipped | (raw_log_ratio != log_ratio), 0.0, -adv * ratio)
    dual_clipped = tl.zeros([BLOCK_SIZE], dtype=tl.int1)
    if HAS_DUAL:
        bound = -adv * dual_clip
        dual_clipped = (adv < 0) & (bound < loss)
        loss = tl.where(dual_clipped, bound, loss)
        grad = tl.where(dual_clipped, 0.0, grad)
    if STORE_GRAD:
        tl.store(grad_ptr + offs, tl.where(valid, grad * weight, 0.0), mask=in_range)
    kl = ratio - 1.0 - log_ratio                 # k3 estimate of KL(old || new)
    _store_partials(partials_ptr, tl.where(valid, loss * weight, 0.0), valid, is_clipped,
                    dual_clipped, kl, ratio)
    tl.store(ratio_max_ptr + tl.program_id(0), tl.max(tl.where(valid, ratio, 0.0), axis=0))


@triton.jit
def _value_loss_kernel(
    values_ptr,       # [n] float
    old_values_ptr,   # [n] float
    returns_ptr,      # [n] float
    mask_ptr,         # [n] uint8/int
    weights_ptr,      # [rows] fp32
    grad_ptr,         # [n] fp32 out: d loss / d values (written only if STORE_GRAD)
    partials_ptr,     # [n_blocks, 6] fp32 out
    n_elements,
    n_steps,
    clip_eps,         # values are clipped to old_values +- clip_eps (used only if HAS_CLIP)
    HAS_CLIP: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offs, in_range, valid, weight, values, old_values, returns = _load_token_block(
        values_ptr, old_values_ptr, returns_ptr, mask_ptr, weights_ptr, n_elements, n_steps,
        BLOCK_SIZE)
    error = values - returns
    loss = 0.5 * error * error
    grad = error
    is_clipped = tl.zeros([BLOCK_SIZE], dtype=tl.int1)
    if HAS_CLIP:
        clipped_values = tl.minimum(tl.maximum(values, old_values - clip_eps), old_values + clip_eps)
        clipped_error = clipped_values - returns
        clipped_loss = 0.5 * clipped_error * clipped_error
        # The clipped term can only win when the value is outside the clip range, where it is
        # flat in the value: gradient 0.
        is_clipped = clipped_loss > loss
        loss = tl.where(is_clipped, clipped_loss, loss)
        grad = tl.where(is_clipped, 0.0, grad)
    if STORE_GRAD:
        tl.store(grad_ptr + offs, tl.where(valid, grad * weight, 0.0), mask=in_range)
    zero = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    _store_partials(partials_ptr, tl.where(valid, loss * weight, 0.0), valid, is_clipped,
                    tl.zeros([BLOCK_SIZE], dtype=tl.int1), zero, zero)


def row_weights(mask: torch.Tensor, agg: str, norm: Optional[float] = None) -> torch.Tensor:
    """Aggregation weight of each row's valid tokens (see module docstring). mask [..., T] -> [rows];
    norm: the constant of seq-mean-token-sum-norm (default T)."""
    lengths = (mask != 0).sum(dim=-1).reshape(-1).float()                   # [rows]
    if agg == "token-mean":
        return (1.0 / lengths.sum().clamp_min(1.0)).expand_as(lengths).contiguous()
    if agg in ("token-sum", "seq-mean-token-sum-norm"):
        scale = 1.0 if agg == "token-sum" else 1.0 / float(norm or mask.shape[-1])
        return torch.full_like(lengths, scale)
    n_seqs = (lengths > 0).sum().clamp_min(1)
    per_seq = lengths.clamp_min(1.0) if agg == "seq-mean-token-mean" else torch.ones_like(lengths)
    return 1.0 / (per_seq * n_seqs)


def _launch(kernel, x, y, z, mask, weights, compute_grad, **scalars):
    """Shared host side of both losses: buffers, grid, launch. Returns (loss, grad, partials, blocks)."""
    n_elements = x.numel()
    n_blocks = max(triton.cdiv(n_elements, BLOCK), 1)
    grad = torch.empty(n_elements if compute_grad else 0, dtype=torch.float32, device=x.device)
    partials = torch.zeros(n_blocks, N_PARTIALS, dtype=torch.float32, device=x.device)
    extra = scalars.pop("extra_outputs", ())
    if n_elements:
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        kernel[(n_blocks,)](x, y, z, mask, weights, grad, partials, *extra,
                            n_elements, x.shape[-1], **scalars, STORE_GRAD=compute_grad,
                            BLOCK_SIZE=BLOCK)
    totals = partials.sum(dim=0)                                            # [N_PARTIALS]
    return totals[LOSS], grad.view(x.shape) if compute_grad else grad, totals


def _fraction(totals: torch.Tensor, column: int) -> torch.Tensor:
    return totals[column] / totals[COUNT].clamp_min(1.0)


@torch.library.custom_op("fusedrl::ppo_policy_loss", mutates_args=())
def _policy_op(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
               mask: torch.Tensor, weights: torch.Tensor, clip_low: float, clip_high: float,
               dual_clip: float, log_ratio_clamp: float, compute_grad: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weights [rows] from row_weights. Returns (loss [], d loss / d logp [...] fp32 or [0],
    stats [5]); dual_clip <= 0 disables it."""
    ratio_max = torch.zeros(max(triton.cdiv(logp.numel(), BLOCK), 1), dtype=torch.float32,
                            device=logp.device)
    loss, grad, totals = _launch(
        _policy_loss_kernel, logp, old_logp, advantages, mask, weights, compute_grad,
        extra_outputs=(ratio_max,), clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp, HAS_DUAL=dual_clip > 0,
    )
    stats = torch.stack([_fraction(totals, CLIPPED), _fraction(totals, DUAL_CLIPPED),
                         _fraction(totals, KL), _fraction(totals, RATIO_SUM), ratio_max.max()])
    return loss, grad, stats


@_policy_op.register_fake
def _policy_fake(logp, old_logp, advantages, mask, weights, clip_low, clip_high, dual_clip,
                 log_ratio_clamp, compute_grad):
    grad = torch.empty(logp.shape if compute_grad else (0,), dtype=torch.float32, device=logp.device)
    return logp.new_empty((), dtype=torch.float32), grad, logp.new_empty(5, dtype=torch.float32)


@torch.library.custom_op("fusedrl::ppo_value_loss", mutates_args=())
def _value_op(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
              mask: torch.Tensor, weights: torch.Tensor, clip_eps: float, compute_grad: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weights [rows] from row_weights. Returns (loss [], d loss / d values [...] fp32 or [0],
    stats [1]); clip_eps < 0 disables it."""
    loss, grad, totals = _launch(_value_loss_kernel, values, old_values, returns, mask, weights,
                                 compute_grad, clip_eps=clip_eps, HAS_CLIP=clip_eps >= 0)
    return loss, grad, _fraction(totals, CLIPPED).reshape(1)


@_value_op.register_fake
def _value_fake(values, old_values, returns, mask, weights, clip_eps, compute_grad):
    grad = torch.empty(values.shape if compute_grad else (0,), dtype=torch.float32,
                       device=values.device)
    return values.new_empty((), dtype=torch.float32), grad, values.new_empty(1, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.input_dtype, ctx.n_inputs = inputs[0].dtype, len(inputs)


def _backward(ctx, grad_loss, _grad_grad, _grad_stats):
    """The per-token derivative was computed in forward: scale it by the upstream scalar."""
    (grad,) = ctx.saved_tensors
    return ((grad_loss * grad).to(ctx.input_dtype),) + (None,) * (ctx.n_inputs - 1)


_policy_op.register_autograd(_backward, setup_context=_setup_context)
_value_op.register_autograd(_backward, setup_context=_setup_context)


def register_cuda_rules() -> None:
    """Fake implementations and autograd of the C++ twins fusedrl::cuda_ppo_*_loss."""
    for name, fake in (("ppo_policy_loss", _policy_fake), ("ppo_value_loss", _value_fake)):
        torch.library.register_fake(f"fusedrl::cuda_{name}", fake)
        torch.library.register_autograd(f"fusedrl::cuda_{name}", _backward,
                                        setup_context=_setup_context)


def _check_loss_inputs(op: str, names: tuple[str, str, str], tensors, mask, agg: str) -> torch.Tensor:
    """Checks shared by both losses; returns the mask (all-valid when None)."""
    first = tensors[0]
    for name, tensor in zip(names, tensors):
        checks.check_float(op, name, tensor)
        checks.check_same_shape(op, name, tensor, names[0], first)
    if first.dim() < 1:
        raise ValueError(f"{op}: {names[0]} must have shape [..., T], got a 0-dim tensor")
    checks.check_choice(op, "agg", agg, AGGS)
    if mask is None:
        return torch.ones_like(first, dtype=torch.bool)
    checks.check_mask(op, mask, names[0], first)
    return mask


def _wants_grad(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: Optional[torch.Tensor], *, clip_eps: float = 0.2,
                    clip_eps_high: Optional[float] = None, dual_clip: Optional[float] = None,
                    agg: str = "token-mean", loss_agg_norm: Optional[float] = None,
                    ratio_level: str = "token", log_ratio_clamp: float = 20.0,
                    rollout_logprobs: Optional[torch.Tensor] = None, is_mode: Optional[str] = None,
                    is_level: str = "token", is_cap: float = 2.0, is_low: float = 0.5, is_high: float = 2.0):
    """PPO-clip policy loss: aggregate of max(-A r, -A clip(r, 1 - eps, 1 + eps_high)).

    Args:
        logp: [..., T] log-probs under the policy being trained (requires grad).
        old_logp: [..., T] log-probs at rollout time. advantages: [..., T]. Both are constants.
        mask: [..., T] bool/integer, nonzero = valid (None: all valid).
        clip_eps / clip_eps_high: the ratio range is [1 - clip_eps, 1 + clip_eps_high]
            (clip_eps_high defaults to clip_eps; a larger one is "clip-higher").
        dual_clip: c > 1; for A < 0 the loss is bounded by -A * c (dual-clip PPO).
        agg: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum" or
            "seq-mean-token-sum-norm" (the token sum / loss_agg_norm, default T; see the module
            docstring).
        ratio_level: "token" (PPO) or "sequence" (GSPO: each sequence's length-normalized ratio,
            clipped per sequence; see kernels/policy_corrections.py).
        log_ratio_clamp: logp - old_logp is clamped to +-this before exp() (gradient 0 beyond).
        rollout_logprobs: [..., T] the sampler's log-probs; with is_mode "tis" (truncated) or
            "mis" (masked, the [is_low, is_high] band) at is_level "token" or "sequence", the
            importance-sampling correction of pi_old / pi_rollout (policy_corrections.py).
    Returns:
        (loss [] fp32, stats) with stats of detached 0-dim fp32 tensors: clipfrac, dual_clipfrac,
        approx_kl (k3 estimate of KL(old || new) of the ratio used), ratio_mean, ratio_max (over
        valid tokens), and with is_mode: is_weight_mean, is_weight_max, is_masked_frac.
    """
    op = "ppo_policy_loss"
    mask = _check_loss_inputs(op, ("logp", "old_logp", "advantages"), (logp, old_logp, advantages),
                              mask, agg)
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
    is_stats = {}
    if is_mode is not None:
        checks.check_choice(op, "is_mode", is_mode, IS_MODES)
        checks.check_choice(op, "is_level", is_level, IS_LEVELS)
        if rollout_logprobs is None:
            raise ValueError(f"{op}: is_mode={is_mode!r} needs rollout_logprobs (the sampler's log-probs)")
        checks.check_float(op, "rollout_logprobs", rollout_logprobs)
        checks.check_same_shape(op, "rollout_logprobs", rollout_logprobs, "logp", logp)
        if not 0 < is_low <= 1 <= is_high or is_cap < 1:
            raise ValueError(f"{op}: need 0 < is_low <= 1 <= is_high and is_cap >= 1, got is_low={is_low}, "
                             f"is_high={is_high}, is_cap={is_cap}")
        scale, mask, is_stats = importance_weights(old_logp, rollout_logprobs.detach(), mask, mode=is_mode,
                                                   level=is_level, cap=is_cap, low=is_low, high=is_high)
        if scale is not None:
            advantages = advantages.float() * scale
    if ratio_level == "sequence":
        logp, old_logp = sequence_ratio_logp(logp, old_logp, mask), old_logp.float()
    backend = backend_for(logp)
    if backend == "torch":
        loss, stats = reference.ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps=clip_eps,
                                                clip_eps_high=eps_high, dual_clip=dual_clip, agg=agg,
                                                loss_agg_norm=loss_agg_norm, log_ratio_clamp=log_ratio_clamp)
        return loss, {**stats, **is_stats}
    wants_grad = _wants_grad(logp)
    logp, old_logp, advantages = kernel_inputs(backend, logp, old_logp, advantages)
    loss, _, stats = fused_op(backend, "ppo_policy_loss")(
        logp.contiguous(), old_logp.contiguous(), advantages.contiguous(), mask.contiguous(),
        row_weights(mask, agg, loss_agg_norm), float(clip_eps), float(eps_high), float(dual_clip or 0.0),
        float(log_ratio_clamp), wants_grad,
    )
    stats = stats.detach()
    names = ("clipfrac", "dual_clipfrac", "approx_kl", "ratio_mean", "ratio_max")
    return loss, {**{name: stats[i] for i, name in enumerate(names)}, **is_stats}


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: Optional[torch.Tensor], *, clip_eps: Optional[float] = 0.2,
                   agg: str = "token-mean", loss_agg_norm: Optional[float] = None):
    """Clipped value loss: aggregate of 0.5 * max((v - R)^2, (clip(v, v_old +- eps) - R)^2).

    Args:
        values: [..., T] critic outputs (requires grad). old_values, returns: [..., T] constants.
        mask: [..., T] bool/integer (None: all valid). clip_eps: None disables clipping.
        agg, loss_agg_norm: as in ppo_policy_loss.
    Returns:
        (loss [] fp32, {"vf_clipfrac": detached 0-dim fp32}).
    """
    op = "ppo_value_loss"
    mask = _check_loss_inputs(op, ("values", "old_values", "returns"), (values, old_values, returns),
                              mask, agg)
    if clip_eps is not None:
        checks.check_positive(op, "clip_eps", clip_eps)
    old_values, returns = old_values.detach(), returns.detach()
    backend = backend_for(values)
    if backend == "torch":
        return reference.ppo_value_loss(values, old_values, returns, mask, clip_eps=clip_eps, agg=agg,
                                        loss_agg_norm=loss_agg_norm)
    wants_grad = _wants_grad(values)
    values, old_values, returns = kernel_inputs(backend, values, old_values, returns)
    loss, _, stats = fused_op(backend, "ppo_value_loss")(
        values.contiguous(), old_values.contiguous(), returns.contiguous(), mask.contiguous(),
        row_weights(mask, agg, loss_agg_norm), -1.0 if clip_eps is None else float(clip_eps), wants_grad,
    )
    return loss, {"vf_clipfrac": stats.detach()[0]}
