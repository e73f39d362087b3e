"""Triton kernels for the decoder's inference-time elementwise work, each beside its PyTorch form.

A decode step of a small model is bound by kernel launches, not bytes: the eager RMSNorm is ~8
kernels and RoPE ~7 per tensor. Here a residual add + RMSNorm is one kernel and RoPE of q and k one
more. They have no backward: the model uses them only when autograd is off (generation), and the
training forward keeps the differentiable PyTorch ops. Each is a torch custom op (fusedrl::add_rms_norm,
fusedrl::rope_inplace): one node to torch.compile, and one op to a TorchDispatchMode such as
bench/traffic_count.py, whatever the Triton launch does inside.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...kernels.triton_compat import tl, triton


# Elements one program handles: short rows (Qwen3's 128-wide q/k norm, 64-wide RoPE halves) are
# packed several to a program so that each thread still moves 16 contiguous bytes.
TILE = 1024


def rows_per_program(row_elements: int) -> int:
    """Rows of `row_elements` (a power of two) packed into one program of about TILE elements."""
    return max(1, TILE // row_elements)


# Row counts are not specialized on (== 1, multiple of 16): a row's code is the same at batch 1 and
# in a training pack, which the batch-invariant mode relies on.
@triton.jit(do_not_specialize=["n_rows"])
def _add_rms_norm_kernel(
    x_ptr,  # [R, C] input rows
    residual_ptr,  # [R, C] residual rows; overwritten with x + residual when HAS_RESIDUAL
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
        x = (x.to(tl.float32) + tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(residual_ptr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)  # [ROWS]
    normed = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)  # transformers rounds before the weight
    w = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (w[None, :] * normed).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_triton(x, weight, eps, residual=None):
    """RMSNorm over the last dim of `x` [..., C]; with `residual`, first `residual += x` in place
    and normalize the sum. Returns the normalized tensor (and `residual` is updated)."""
    _check_norm(x, weight, residual)
    return torch.ops.fusedrl.add_rms_norm(x, weight, eps, residual)


@torch.library.custom_op("fusedrl::add_rms_norm", mutates_args=("residual",))
def _add_rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: Optional[torch.Tensor]) -> torch.Tensor:
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    block = triton.next_power_of_2(n_cols)
    rows = rows_per_program(block)
    out = torch.empty_like(x)
    _add_rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
        x, x if residual is None else residual, weight, out, n_rows, n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, ROWS=rows)
    return out


@_add_rms_norm_op.register_fake
def _add_rms_norm_fake(x, weight, eps, residual):
    return torch.empty_like(x)


def rms_norm_torch(x, weight, eps):
    """RMSNorm over the last dim, op for op as transformers computes it (fp32 statistics, rounded to
    x's dtype before the weight). The reference of `add_rms_norm_triton` after the residual add."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def _check_norm(x, weight, residual):
    if not x.is_contiguous() or (residual is not None and (not residual.is_contiguous() or residual.shape != x.shape)):
        raise ValueError("x (and residual, of x's shape) must be contiguous")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")


@triton.jit(do_not_specialize=["n_rows"])
def _rope_kernel(
    x_ptr,  # [N, heads, D] q or k rows, rotated in place
    cos_ptr,  # [N, D] cos of each token's position (both halves equal)
    sin_ptr,  # [N, D]
    n_rows,  # N * heads: (token, head) rows
    heads,
    row_stride,  # elements between tokens of x
    head_stride,  # elements between heads of x
    HALF: tl.constexpr,  # D / 2
    HALF_PAD: tl.constexpr,  # HALF rounded up to a power of two
    ROWS: tl.constexpr,  # (token, head) rows per program
):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    token = r // heads
    d = tl.arange(0, HALF_PAD)
    mask = (r[:, None] < n_rows) & (d[None, :] < HALF)
    x_off = (token * row_stride + (r - token * heads) * head_stride)[:, None] + d[None, :]
    cs_off = (token * 2 * HALF)[:, None] + d[None, :]
    x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + cs_off, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + cs_off, mask=mask, other=0.0).to(tl.float32)
    # rotate_half(x) = (-x2, x1): out = x * cos + rotate_half(x) * sin
    tl.store(x_ptr + x_off, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(x_ptr + x_off + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


def rope_triton_(x, cos, sin):
    """Rotate `x` [N, heads, D] in place by the angles in cos/sin [N, D]; returns x."""
    n, heads, dim = x.shape
    if x.stride(2) != 1 or cos.shape != (n, dim) or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"x {tuple(x.shape)} (last dim contiguous) and contiguous cos/sin "
                         f"[{n}, {dim}] expected, got cos {tuple(cos.shape)}")
    torch.ops.fusedrl.rope_inplace(x, cos, sin)
    return x


@torch.library.custom_op("fusedrl::rope_inplace", mutates_args=("x",))
def _rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    n, heads, dim = x.shape
    half_pad = triton.next_power_of_2(dim // 2)
    rows = rows_per_program(half_pad)  # each row is loaded as two halves
    _rope_kernel[(triton.cdiv(n * heads, rows),)](
        x, cos, sin, n * heads, heads, x.stride(0), x.stride(1), HALF=dim // 2, HALF_PAD=half_pad,
        ROWS=rows)


@_rope_op.register_fake
def _rope_fake(x, cos, sin):
    return None


def rope_torch(x, cos, sin):
    """Reference for `rope_triton_` (out of place): x [N, heads, D]; cos/sin [N, D] in x's dtype.
    Rotate-half convention, transformers' op order."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
