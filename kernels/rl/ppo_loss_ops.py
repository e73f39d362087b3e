"""Host side of the Triton PPO losses (kernels in ppo_loss_kernels.py): buffers, grids, launches,
and the custom ops (fake impl + autograd) every call goes through. Three launches per forward +
backward, no host sync:

    forward   row kernel (per-token term, its derivative, per-program partials) + finalize kernel
              (row weights, loss, stats)
    backward  d loss / d x = upstream * row weight * derivative
"""
from __future__ import annotations

from typing import Optional

import torch

from .ppo_loss_kernels import (IS_MIS, IS_NONE, IS_TIS, N_PARTIALS, STATS, _finalize_kernel,
                               _policy_rows_kernel, _scaled_grad_kernel, _value_rows_kernel)
from ..triton_compat import triton
from ..direct_ops import direct_op

# tokens per step of a row program: 8 fp32 per thread at 4 warps (two 128-bit loads)
BLOCK = 1024
MAX_CHUNK_BLOCKS = 4  # a program covers at most 4 blocks of a row, unless it needs the whole row
ROW_BLOCK = 256       # rows per step of the finalize kernel
IS_MODE_IDS = {None: IS_NONE, "tis": IS_TIS, "mis": IS_MIS}


def _chunking(n_steps: int, whole_rows: bool) -> tuple[int, int]:
    """(tokens of a row per program, programs per row)."""
    blocks = triton.cdiv(n_steps, BLOCK)
    per_program = blocks if whole_rows else min(blocks, MAX_CHUNK_BLOCKS)
    chunk = max(per_program, 1) * BLOCK
    return chunk, triton.cdiv(n_steps, chunk)


def _as_loadable(mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A mask the kernels can load (bool viewed as uint8), or a dummy pointer if none."""
    if mask is None:
        return like
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _finalize(partials: torch.Tensor, n_rows: int, n_chunks: int, agg: int, norm: float):
    """(loss [] fp32, stats [len(STATS)] fp32, row weights [rows] fp32) from the partials."""
    device = partials.device
    loss = torch.empty((), dtype=torch.float32, device=device)
    stats = torch.empty(len(STATS), dtype=torch.float32, device=device)
    weights = torch.empty(n_rows, dtype=torch.float32, device=device)
    _finalize_kernel[(1,)](partials, loss, stats, weights, n_rows, n_chunks, norm, AGG=agg,
                           ROW_BLOCK=ROW_BLOCK, num_warps=8)
    return loss, stats, weights


def _row_buffers(x: torch.Tensor, n_chunks: int, compute_grad: bool):
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] else x.numel()
    dterm = torch.empty(x.shape if compute_grad else (0,), dtype=torch.float32, device=x.device)
    partials = torch.empty(n_rows, n_chunks, N_PARTIALS, dtype=torch.float32, device=x.device)
    return n_rows, dterm, partials


def policy_forward(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                   mask: Optional[torch.Tensor], rollout_logp: Optional[torch.Tensor], agg: int,
                   norm: float, clip_low: float, clip_high: float, dual_clip: float,
                   log_ratio_clamp: float, is_mode: int, is_sequence: bool, is_cap: float,
                   is_low: float, is_high: float, sequence_ratio: bool, compute_grad: bool):
    """Contiguous [..., T] inputs -> (loss [], stats [len(STATS)], d term / d logp [...] fp32 or
    [0], row weights [rows]). agg: index in statistics.AGGS; is_mode: IS_NONE / IS_TIS / IS_MIS;
    dual_clip <= 0 disables it."""
    n_steps = logp.shape[-1]
    chunk, n_chunks = _chunking(n_steps, sequence_ratio or (is_mode != IS_NONE and is_sequence))
    n_rows, dterm, partials = _row_buffers(logp, n_chunks, compute_grad)
    if logp.numel():
        _policy_rows_kernel[(n_rows, n_chunks)](
            logp, old_logp, advantages, _as_loadable(mask, logp),
            logp if rollout_logp is None else rollout_logp, dterm, partials, n_steps, chunk,
            clip_low, clip_high, dual_clip, log_ratio_clamp, is_cap, is_low, is_high,
            HAS_MASK=mask is not None, HAS_DUAL=dual_clip > 0, IS_MODE=is_mode, IS_SEQ=is_sequence,
            SEQ_RATIO=sequence_ratio, STORE_GRAD=compute_grad, BLOCK_SIZE=BLOCK)
    loss, stats, weights = _finalize(partials, n_rows, n_chunks if logp.numel() else 0, agg, norm)
    return loss, stats, dterm, weights


def value_forward(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                  mask: Optional[torch.Tensor], agg: int, norm: float, clip_eps: float,
                  compute_grad: bool):
    """As policy_forward for the value loss; clip_eps < 0 disables clipping; stats[0] is the
    clip fraction."""
    n_steps = values.shape[-1]
    chunk, n_chunks = _chunking(n_steps, False)
    n_rows, dterm, partials = _row_buffers(values, n_chunks, compute_grad)
    if values.numel():
        _value_rows_kernel[(n_rows, n_chunks)](
            values, old_values, returns, _as_loadable(mask, values), dterm, partials, n_steps,
            chunk, clip_eps, HAS_MASK=mask is not None, HAS_CLIP=clip_eps >= 0,
            STORE_GRAD=compute_grad, BLOCK_SIZE=BLOCK)
    loss, stats, weights = _finalize(partials, n_rows, n_chunks if values.numel() else 0, agg, norm)
    return loss, stats, dterm, weights


def scaled_grad(grad_loss: torch.Tensor, dterm: torch.Tensor, weights: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """upstream [] * weights[row] * dterm [..., T] -> [..., T] in dtype (one launch)."""
    grad = torch.empty(dterm.shape, dtype=dtype, device=dterm.device)
    if dterm.numel():
        _scaled_grad_kernel[(triton.cdiv(dterm.numel(), BLOCK),)](
            grad_loss, dterm, weights, grad, dterm.numel(), dterm.shape[-1], BLOCK_SIZE=BLOCK)
    return grad


@direct_op("fusedrl::ppo_policy_loss_fwd", mutates_args=())
def policy_loss_op(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                   mask: Optional[torch.Tensor], rollout_logp: Optional[torch.Tensor], agg: int,
                   norm: float, clip_low: float, clip_high: float, dual_clip: float,
                   log_ratio_clamp: float, is_mode: int, is_sequence: bool, is_cap: float,
                   is_low: float, is_high: float, sequence_ratio: bool, compute_grad: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return policy_forward(logp, old_logp, advantages, mask, rollout_logp, agg, norm, clip_low,
                          clip_high, dual_clip, log_ratio_clamp, is_mode, is_sequence, is_cap,
                          is_low, is_high, sequence_ratio, compute_grad)


@direct_op("fusedrl::ppo_value_loss_fwd", mutates_args=())
def value_loss_op(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                  mask: Optional[torch.Tensor], agg: int, norm: float, clip_eps: float,
                  compute_grad: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return value_forward(values, old_values, returns, mask, agg, norm, clip_eps, compute_grad)


@direct_op("fusedrl::ppo_loss_grad", mutates_args=())
def _grad_op(grad_loss: torch.Tensor, dterm: torch.Tensor, weights: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    return scaled_grad(grad_loss, dterm, weights, dtype)


def _fwd_fake(x, *args):
    compute_grad = args[-1]
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] else x.numel()
    return (x.new_empty((), dtype=torch.float32), x.new_empty(len(STATS), dtype=torch.float32),
            x.new_empty(x.shape if compute_grad else (0,), dtype=torch.float32),
            x.new_empty(n_rows, dtype=torch.float32))


@_grad_op.register_fake
def _grad_fake(grad_loss, dterm, weights, dtype):
    return torch.empty(dterm.shape, dtype=dtype, device=dterm.device)


def _setup_context(ctx, inputs, output):
    _, stats, dterm, weights = output
    ctx.save_for_backward(dterm, weights)
    ctx.x_dtype, ctx.n_inputs = inputs[0].dtype, len(inputs)
    ctx.mark_non_differentiable(stats, dterm, weights)
    # no zeros for the other outputs' (absent) gradients: launches saved
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_stats, _grad_dterm, _grad_weights):
    dterm, weights = ctx.saved_tensors
    return (_grad_op(grad_loss, dterm, weights, ctx.x_dtype),) + (None,) * (ctx.n_inputs - 1)


for _op in (policy_loss_op, value_loss_op):
    _op.register_fake(_fwd_fake)
    _op.register_autograd(_backward, setup_context=_setup_context)
