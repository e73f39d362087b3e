"""Tokens to experts and back: the permute before a mixture-of-experts layer's grouped GEMMs and the
weighted unpermute after them, forward and backward.

A layer routes each of T tokens to k experts: T * k slots (slot s = token s // k, its (s % k)-th
choice). `moe_sort` (moe_gemm.py) orders the slots by expert: `order[j]` is the slot of sorted row
j and `slot_rows[s]` the sorted row of slot s (the inverse permutation). Then
  moe_permute(x [T, H], order, k) -> rows [T*k, H], rows[j] = x[order[j] // k]
  moe_unpermute(y [T*k, H], order, slot_rows, weights [T, k]) -> out [T, H],
      out[t] = sum_i weights[t, i] * y[slot_rows[t*k + i]], accumulated in fp32
so the routing weights are applied in the same pass that gathers each token's k rows back (no
[T*k, H] product written). The backward of each is the other's kernel: permute's is the unweighted
combine, unpermute's a gather scaled by the weights, plus one dot per slot for the weights' grad.
All index arrays are device tensors; nothing here reads a value on the host, so a decode step with
these ops stays capturable in a CUDA graph.

Backends as every op (kernels/dispatch.py): Triton for CUDA tensors and under TRITON_INTERPRET=1,
`reference.moe_permute` / `reference.moe_unpermute` otherwise. Custom ops fusedrl::moe_gather_rows,
fusedrl::moe_combine and fusedrl::moe_slot_dots.
"""
from __future__ import annotations

import torch

from .. import checks
from ..dispatch import backend_for
from ..reference.moe import moe_permute as _reference_permute
from ..reference.moe import moe_unpermute as _reference_unpermute
from ..triton_compat import tl, triton
from ..direct_ops import direct_op

# Columns per program: one row's block, 16 bytes per thread at 4 warps in bf16 (as silu_mul).
BLOCK_COLS = 1024


@triton.jit
def _row_block(n_cols, BLOCK: tl.constexpr):
    """This program's row (int64) and its block of columns with their in-range flags."""
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return tl.program_id(0).to(tl.int64), cols, cols < n_cols


@triton.jit
def _gather_rows_kernel(
    src_ptr,  # [n_src, n_cols] contiguous
    order_ptr,  # [n_rows] int64: the slot of each output row
    scale_ptr,  # [n_rows] fp32 per slot (HAS_SCALE) or unused
    out_ptr,  # [n_rows, n_cols] out
    n_cols,
    TOP_K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, cols, mask = _row_block(n_cols, BLOCK)
    slot = tl.load(order_ptr + row)
    vals = tl.load(src_ptr + (slot // TOP_K) * n_cols + cols, mask=mask, other=0.0)
    if HAS_SCALE:
        vals = vals.to(tl.float32) * tl.load(scale_ptr + slot).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, vals.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(
    y_ptr,  # [n_tokens * TOP_K, n_cols] contiguous, rows sorted by expert
    slot_rows_ptr,  # [n_tokens * TOP_K] int64: the row of y of each slot
    weights_ptr,  # [n_tokens * TOP_K] (HAS_WEIGHTS) or unused
    out_ptr,  # [n_tokens, n_cols] out
    n_cols,
    TOP_K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token, cols, mask = _row_block(n_cols, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.static_range(TOP_K):  # the token's choices in routing order, as one fp32 sum
        row = tl.load(slot_rows_ptr + token * TOP_K + i)
        vals = tl.load(y_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            vals = vals * tl.load(weights_ptr + token * TOP_K + i).to(tl.float32)
        acc += vals
    tl.store(out_ptr + token * n_cols + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _slot_dots_kernel(
    grad_out_ptr,  # [n_tokens, n_cols] contiguous
    y_ptr,  # [n_tokens * TOP_K, n_cols]
    slot_rows_ptr,  # [n_tokens * TOP_K] int64
    dots_ptr,  # [n_tokens * TOP_K] fp32 out
    n_cols,
    TOP_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    slot = tl.program_id(0).to(tl.int64)
    row = tl.load(slot_rows_ptr + slot)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(grad_out_ptr + (slot // TOP_K) * n_cols + cols, mask=mask,
                    other=0.0).to(tl.float32)
        acc += g * tl.load(y_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dots_ptr + slot, tl.sum(acc, axis=0))


def _grid(n_rows: int, n_cols: int):
    return (n_rows, triton.cdiv(n_cols, BLOCK_COLS))


@direct_op("fusedrl::moe_gather_rows", mutates_args=())
def _gather_rows_op(src: torch.Tensor, order: torch.Tensor, scale: torch.Tensor | None,
                    top_k: int) -> torch.Tensor:
    out = src.new_empty(order.shape[0], src.shape[1])
    if out.numel():
        _gather_rows_kernel[_grid(*out.shape)](src, order, scale if scale is not None else order,
                                               out, out.shape[1], TOP_K=top_k,
                                               HAS_SCALE=scale is not None, BLOCK=BLOCK_COLS)
    return out


@_gather_rows_op.register_fake
def _gather_rows_fake(src, order, scale, top_k):
    return src.new_empty(order.shape[0], src.shape[1])


@direct_op("fusedrl::moe_combine", mutates_args=())
def _combine_op(y: torch.Tensor, slot_rows: torch.Tensor, weights: torch.Tensor | None,
                top_k: int) -> torch.Tensor:
    out = y.new_empty(slot_rows.shape[0] // top_k, y.shape[1])
    if out.numel():
        _combine_kernel[_grid(*out.shape)](y, slot_rows,
                                           weights if weights is not None else slot_rows, out,
                                           out.shape[1], TOP_K=top_k,
                                           HAS_WEIGHTS=weights is not None, BLOCK=BLOCK_COLS)
    return out


@_combine_op.register_fake
def _combine_fake(y, slot_rows, weights, top_k):
    return y.new_empty(slot_rows.shape[0] // top_k, y.shape[1])


@direct_op("fusedrl::moe_slot_dots", mutates_args=())
def _slot_dots_op(grad_out: torch.Tensor, y: torch.Tensor, slot_rows: torch.Tensor,
                  top_k: int) -> torch.Tensor:
    dots = torch.empty(slot_rows.shape[0], dtype=torch.float32, device=y.device)
    if dots.numel():
        _slot_dots_kernel[(dots.numel(),)](grad_out, y, slot_rows, dots, y.shape[1], TOP_K=top_k,
                                           BLOCK=BLOCK_COLS)
    return dots


@_slot_dots_op.register_fake
def _slot_dots_fake(grad_out, y, slot_rows, top_k):
    return torch.empty(slot_rows.shape[0], dtype=torch.float32, device=y.device)


def _permute_setup(ctx, inputs, output):
    _, order, _, top_k = inputs
    ctx.top_k = top_k
    ctx.n_tokens = inputs[0].shape[0]
    ctx.save_for_backward(order)


def _permute_backward(ctx, grad_rows):
    (order,) = ctx.saved_tensors
    # Sum each token's k row gradients: the combine over the inverse permutation, unweighted.
    slot_rows = torch.empty_like(order).scatter_(0, order,
                                                 torch.arange(order.numel(), device=order.device))
    return _combine_op(grad_rows.contiguous(), slot_rows, None, ctx.top_k), None, None, None


_gather_rows_op.register_autograd(_permute_backward, setup_context=_permute_setup)


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, order, slot_rows, weights, top_k):
        ctx.save_for_backward(y, order, slot_rows, weights)
        ctx.top_k = top_k
        return _combine_op(y, slot_rows, weights, top_k)

    @staticmethod
    def backward(ctx, grad_out):
        y, order, slot_rows, weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_y = _gather_rows_op(grad_out, order, weights, ctx.top_k)
        grad_w = _slot_dots_op(grad_out, y, slot_rows, ctx.top_k).to(weights.dtype) \
            if ctx.needs_input_grad[3] else None
        return grad_y, None, None, grad_w, None


def _check_indices(op: str, x: torch.Tensor, order: torch.Tensor, slot_rows: torch.Tensor | None,
                   n_slots: int):
    checks.check_float(op, "x" if slot_rows is None else "y", x)
    for name, index in (("order", order), ("slot_rows", slot_rows)):
        if index is None:
            continue
        if index.dtype != torch.int64 or index.shape != (n_slots,) or index.device != x.device:
            raise ValueError(
                f"{op}: {name} is {index.dtype} {tuple(index.shape)} on {index.device}: expected "
                "int64 "
                f"({n_slots},) on {x.device}")
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"{op}: input {tuple(x.shape)} must be a contiguous [rows, hidden] matrix")


def moe_permute(x: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
    """x [T, H] contiguous, order [T*k] int64 (moe_sort's) -> rows [T*k, H] sorted by expert, row j
    the token of slot order[j]; differentiable in x."""
    if top_k < 1:
        raise ValueError(f"moe_permute: top_k={top_k} must be >= 1")
    _check_indices("moe_permute", x, order, None, x.shape[0] * top_k)
    if backend_for(x) == "torch":
        return _reference_permute(x, order, top_k)
    return _gather_rows_op(x, order, None, top_k)


def moe_unpermute(y: torch.Tensor, order: torch.Tensor, slot_rows: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """y [T*k, H] (expert outputs, rows sorted by expert), order and slot_rows [T*k] int64
    (moe_sort's), weights [T, k] -> out [T, H] in y's dtype, each token's k rows weighted and
    summed in fp32; differentiable in y and weights."""
    if (weights.dim() != 2 or weights.shape[0] * weights.shape[1] != y.shape[0]
        or weights.device != y.device):
        raise ValueError(
            f"moe_unpermute: weights {tuple(weights.shape)} on {weights.device} must be [T, k] "
            "with "
            f"T * k = {y.shape[0]} rows of y on {y.device}")
    checks.check_float("moe_unpermute", "weights", weights)
    _check_indices("moe_unpermute", y, order, slot_rows, y.shape[0])
    if backend_for(y) == "torch":
        return _reference_unpermute(y, slot_rows, weights)
    return _Unpermute.apply(y, order, slot_rows, weights.contiguous().view(-1), weights.shape[1])
