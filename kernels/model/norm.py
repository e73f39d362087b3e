"""RMSNorm with the residual add, forward and backward, for training, scoring and decode alike.

The decoder's norms (and Qwen3's per-head q/k norms) as one kernel each way: forward, `s = x +
residual` (rounded to the activation dtype, as `x + residual` in torch) and `y = w * round(s *
rstd)`, the statistics in fp32 and the normalized row rounded before the weight, as transformers
computes it; backward recomputes rstd from `s` and writes ds (which is dx and d residual, plus the
gradient arriving at `s` itself) and per-program partial sums of dw, summed once. Eager PyTorch
spends ~8 kernels each way on this. The same forward kernel runs with autograd on or off, so the
log-probs of a scoring forward and of the update's forward are the same numbers.

Backends as every op (kernels/dispatch.py): Triton for CUDA tensors and under TRITON_INTERPRET=1,
`reference.rms_norm` (the eager composition, differentiated by autograd) otherwise. Custom ops
fusedrl::rms_norm, fusedrl::add_rms_norm (forward), fusedrl::rms_norm_bwd, each one op to
torch.compile and to a TorchDispatchMode such as bench/traffic_count.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks, reference
from ..dispatch import backend_for
from ..triton_compat import tl, triton
from ..direct_ops import direct_op

# Elements one program handles: short rows (Qwen3's 128-wide q/k norm) are packed several to a
# program so that each thread still moves 16 contiguous bytes.
TILE = 1024
# Backward programs (each loops over rows, keeping its dw partial in registers): a few per SM of an
# H100 (132), so the partials [programs, C] stay small next to the rows.
BWD_PROGRAMS = 512


def rows_per_program(row_elements: int) -> int:
    """Rows of `row_elements` (a power of two) packed into one program of about TILE elements."""
    return max(1, TILE // row_elements)


# Row counts are not specialized on (== 1, multiple of 16): a row's code is the same at batch 1 and
# in a training pack, which the batch-invariant mode relies on.
@triton.jit(do_not_specialize=["n_rows"])
def _add_rms_norm_kernel(
    x_ptr,  # [R, C] input rows
    residual_ptr,  # [R, C] residual rows (read only if HAS_RESIDUAL)
    sum_ptr,  # [R, C] out: x + residual (written only if HAS_RESIDUAL)
    weight_ptr,  # [C]
    out_ptr,  # [R, C] normalized rows
    n_rows,  # R
    n_cols,  # C
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # n_cols rounded up to a power of two
    ROWS: tl.constexpr,  # rows per program
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows[:, None] * n_cols + cols[None, :]  # [ROWS, BLOCK]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Rounded to the activation dtype before the norm reads it, as `x + residual` in torch.
        x = (
            x.to(tl.float32)
            + tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)  # [ROWS]
    # transformers rounds before the weight
    normed = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (w[None, :] * normed).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
# [programs, C] fp32 out: this program's sum over its rows of dy * round(s * rstd)
def _rms_norm_bwd_kernel(
    grad_out_ptr,  # [R, C] dL/dy
    grad_sum_ptr,  # [R, C] dL/ds arriving at the sum output (read only if HAS_GRAD_SUM)
    s_ptr,  # [R, C] the normalized input (x + residual)
    weight_ptr,  # [C]
    grad_s_ptr,  # [R, C] out: dL/ds, which is dL/dx and dL/d residual
    dw_partial_ptr,
    n_rows,  # R
    n_cols,  # C
    eps,
    HAS_GRAD_SUM: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in range(pid * ROWS, n_rows, tl.num_programs(0) * ROWS):  # grid-stride over row tiles
        rows = start + tl.arange(0, ROWS).to(tl.int64)
        mask = (rows[:, None] < n_rows) & col_ok[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        s_raw = tl.load(s_ptr + offs, mask=mask, other=0.0)
        s = s_raw.to(tl.float32)
        dy = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / n_cols + eps)  # [ROWS], as the forward
        normed = s * rstd[:, None]
        dw += dy * normed.to(s_raw.dtype).to(tl.float32)  # the weight multiplied the rounded row
        dn = dy * w[None, :]
        # d/ds of s * rstd(s): rstd * (dn - normed * mean(dn * normed)); the rounding passes
        # gradients as is.
        ds = rstd[:, None] * (dn - normed * (tl.sum(dn * normed, axis=1) / n_cols)[:, None])
        if HAS_GRAD_SUM:
            ds += tl.load(grad_sum_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_s_ptr + offs, ds.to(grad_s_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)


def _launch_fwd(x, weight, eps, residual):
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    block = triton.next_power_of_2(n_cols)
    rows = rows_per_program(block)
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else None
    if n_rows:
        _add_rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
            x, x if residual is None else residual, x if total is None else total, weight, out,
            n_rows, n_cols, eps, HAS_RESIDUAL=residual is not None, BLOCK=block, ROWS=rows)
    return out, total


@direct_op("fusedrl::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch_fwd(x, weight, eps, None)[0]


@_rms_norm_op.register_fake
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x)


@direct_op("fusedrl::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(x, weight, eps, residual)


@_add_rms_norm_op.register_fake
def _add_rms_norm_fake(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@direct_op("fusedrl::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(grad_out: torch.Tensor, grad_sum: Optional[torch.Tensor], s: torch.Tensor,
                     weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_cols = s.shape[-1]
    n_rows = s.numel() // n_cols
    block = triton.next_power_of_2(n_cols)
    rows = rows_per_program(block)
    programs = max(1, min(BWD_PROGRAMS, triton.cdiv(n_rows, rows)))
    grad_s = torch.empty_like(s)
    partials = torch.empty(programs, n_cols, dtype=torch.float32, device=s.device)
    if n_rows:
        _rms_norm_bwd_kernel[(programs,)](
            grad_out.contiguous(), s if grad_sum is None else grad_sum.contiguous(), s, weight,
            grad_s, partials, n_rows, n_cols, eps, HAS_GRAD_SUM=grad_sum is not None, BLOCK=block,
            ROWS=rows)
    else:
        partials.zero_()
    # One fixed-order reduction of the partials: the same dw bits at every run.
    return grad_s, partials.sum(0).to(weight.dtype)


@_rms_norm_bwd_op.register_fake
def _rms_norm_bwd_fake(grad_out, grad_sum, s, weight, eps):
    return torch.empty_like(s), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_norm_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x, grad_w = _rms_norm_bwd_op(grad_out, None, x, weight, ctx.eps)
    return grad_x, grad_w, None


def _add_rms_norm_setup(ctx, inputs, output):
    _, _, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps


def _add_rms_norm_backward(ctx, grad_out, grad_sum):
    total, weight = ctx.saved_tensors
    grad_s, grad_w = _rms_norm_bwd_op(grad_out, grad_sum, total, weight, ctx.eps)
    return grad_s, grad_s, grad_w, None  # s = x + residual: both receive dL/ds


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)
_add_rms_norm_op.register_autograd(_add_rms_norm_backward, setup_context=_add_rms_norm_setup)


def _check(x, weight, eps, residual):
    for name, tensor in (("x", x),
                         ("weight", weight)) + ((("residual", residual),) if residual is not None
                                                else ()):
        checks.check_float("rms_norm", name, tensor)
    checks.check_last_dim("rms_norm", "x", x)
    checks.check_nonnegative("rms_norm", "eps", eps)
    if not x.is_contiguous() or (residual is not None and not residual.is_contiguous()):
        raise ValueError(
            f"rms_norm: x (and residual) must be contiguous, got x strides {x.stride()}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"rms_norm: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(
            f"rms_norm: weight {tuple(weight.shape)} does not match x {tuple(x.shape)}: "
            f"expected [{x.shape[-1]}]")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None):
    """RMSNorm over the last dim of x [..., C] with weight [C]; differentiable in x, residual and
    weight.

    Without residual: y [..., C]. With residual [..., C] (x's shape; x's dtype on the fused
    kernels): (y, s) where s = x + residual, the normalized input and the next residual stream;
    nothing is modified in place.
    """
    _check(x, weight, eps, residual)
    # promotes mixed dtypes as eager PyTorch does (autocast's bf16 x, fp32 residual)
    if backend_for(x) == "torch":
        return reference.rms_norm(x, weight, eps, residual)
    if residual is not None and residual.dtype != x.dtype:
        raise ValueError(
            f"rms_norm: residual {residual.dtype} must have x's dtype {x.dtype} on the fused "
            "kernels")
    if residual is None:
        return _rms_norm_op(x, weight, eps)
    return _add_rms_norm_op(x, residual, weight, eps)
