"""M-RoPE (a vision-language model's multimodal rotary embedding) of q and k in one launch, forward
and backward, reading the angles straight from the cos/sin tables.

A token has three positions (time, height, width: positions [3, N]); rotary frequency d takes its
angle at the position of axis axes[d] (Qwen2.5-VL: three contiguous sections, Qwen3-VL:
interleaved). Eager PyTorch gathers three [N, D] rows per table and composes them (transformers'
recomposition) before the rotation; here each (token, head) row loads its axis's positions and the
table entries it needs, and rotates, as rotary.py's kernel does: x * cos + rotate_half(x) * sin in
fp32, rounded once; the backward is the same kernel with the angle negated. The tables' two halves
are equal (engine/model/rotary.py's RotaryTable), so the first half's angles serve both.

Backends as every op (kernels/dispatch.py): Triton for CUDA tensors and under TRITON_INTERPRET=1,
`reference.mrope` otherwise. Custom ops fusedrl::mrope and fusedrl::mrope_bwd.
"""
from __future__ import annotations

import torch

from .. import checks, reference
from ..dispatch import backend_for
from .norm import rows_per_program
from .rotary import rotate_at
from ..triton_compat import tl, triton
from ..direct_ops import direct_op


@triton.jit
def _mrope_rows(x_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr, axes_ptr, first_row, n_rows, n_tokens,
                heads, row_stride, head_stride, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                ROWS: tl.constexpr, BACKWARD: tl.constexpr):
    """Rotate (token, head) rows [first_row, first_row + ROWS) of x [N, heads, D] into out
    (contiguous) by the angles of table rows positions[axes[d], token]."""
    r = first_row + tl.arange(0, ROWS).to(tl.int64)
    token = r // heads
    head = r - token * heads
    d = tl.arange(0, HALF_PAD)
    mask = (r[:, None] < n_rows) & (d[None, :] < HALF)
    axis = tl.load(axes_ptr + d, mask=d < HALF, other=0).to(tl.int64)
    position = tl.load(pos_ptr + axis[None, :] * n_tokens + token[:, None], mask=mask, other=0)
    cs_off = position.to(tl.int64) * 2 * HALF + d[None, :]
    x_off = (token * row_stride + head * head_stride)[:, None] + d[None, :]
    out_off = (r * 2 * HALF)[:, None] + d[None, :]
    rotate_at(x_ptr, out_ptr, cos_ptr, sin_ptr, x_off, out_off, cs_off, mask, HALF, BACKWARD)


@triton.jit(do_not_specialize=["n_tokens", "q_programs"])
def _mrope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, pos_ptr, axes_ptr,
                  n_tokens, q_heads, k_heads, q_row_stride, q_head_stride, k_row_stride,
                  k_head_stride, q_programs, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                  ROWS: tl.constexpr, BACKWARD: tl.constexpr):
    pid = tl.program_id(0)
    if pid < q_programs:
        _mrope_rows(q_ptr, q_out_ptr, cos_ptr, sin_ptr, pos_ptr, axes_ptr, pid.to(tl.int64) * ROWS,
                    n_tokens * q_heads, n_tokens, q_heads, q_row_stride, q_head_stride, HALF,
                    HALF_PAD, ROWS, BACKWARD)
    else:
        _mrope_rows(k_ptr, k_out_ptr, cos_ptr, sin_ptr, pos_ptr, axes_ptr,
                    (pid - q_programs).to(tl.int64) * ROWS, n_tokens * k_heads, n_tokens, k_heads,
                    k_row_stride, k_head_stride, HALF, HALF_PAD, ROWS, BACKWARD)


def _launch(q, k, cos_table, sin_table, positions, axes, backward: bool):
    n, q_heads, dim = q.shape
    k_heads = k.shape[1]
    half_pad = triton.next_power_of_2(dim // 2)
    rows = rows_per_program(half_pad)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    q_programs = triton.cdiv(n * q_heads, rows)
    programs = q_programs + triton.cdiv(n * k_heads, rows)
    if programs:
        _mrope_kernel[(programs,)](
            q, k, q_out, k_out, cos_table, sin_table, positions, axes, n, q_heads, k_heads,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_programs, HALF=dim // 2,
            HALF_PAD=half_pad, ROWS=rows, BACKWARD=backward)
    return q_out, k_out


@direct_op("fusedrl::mrope", mutates_args=())
def _mrope_op(q: torch.Tensor, k: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
              positions: torch.Tensor, axes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, cos_table, sin_table, positions, axes, backward=False)


@_mrope_op.register_fake
def _mrope_fake(q, k, cos_table, sin_table, positions, axes):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device))


@direct_op("fusedrl::mrope_bwd", mutates_args=())
def _mrope_bwd_op(grad_q: torch.Tensor, grad_k: torch.Tensor, cos_table: torch.Tensor,
                  sin_table: torch.Tensor, positions: torch.Tensor,
                  axes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(grad_q, grad_k, cos_table, sin_table, positions, axes, backward=True)


@_mrope_bwd_op.register_fake
def _mrope_bwd_fake(grad_q, grad_k, cos_table, sin_table, positions, axes):
    return _mrope_fake(grad_q, grad_k, cos_table, sin_table, positions, axes)


def _mrope_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[2:])


def _mrope_backward(ctx, grad_q, grad_k):
    grad_q, grad_k = (g if g.stride(-1) == 1 else g.contiguous() for g in (grad_q, grad_k))
    dq, dk = _mrope_bwd_op(grad_q, grad_k, *ctx.saved_tensors)
    return dq, dk, None, None, None, None


_mrope_op.register_autograd(_mrope_backward, setup_context=_mrope_setup)


def _check(q, k, cos_table, sin_table, positions, axes):
    for name, tensor in (("q", q), ("k", k), ("cos_table", cos_table), ("sin_table", sin_table)):
        checks.check_float("mrope", name, tensor)
    if (q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]
            or q.shape[2] % 2):
        raise ValueError(f"mrope: q [N, Hq, D] and k [N, Hk, D] with one N and an even D "
                         f"expected, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError(f"mrope: the last dim of q and k must be contiguous, got strides "
                         f"{q.stride()} and {k.stride()}")
    n, dim = q.shape[0], q.shape[2]
    for name, t in (("cos_table", cos_table), ("sin_table", sin_table)):
        if t.dim() != 2 or t.shape[1] != dim or not t.is_contiguous():
            raise ValueError(f"mrope: {name} must be contiguous [L, {dim}], got "
                             f"{tuple(t.shape)} with strides {t.stride()}")
    if tuple(positions.shape) != (3, n) or positions.dtype != torch.int64 or (
            not positions.is_contiguous()):
        raise ValueError(f"mrope: positions must be contiguous int64 [3, {n}], got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    if tuple(axes.shape) != (dim // 2,) or axes.dtype != torch.int64:
        raise ValueError(f"mrope: axes must be int64 [{dim // 2}] (0, 1 or 2 per frequency), got "
                         f"{axes.dtype} {tuple(axes.shape)}")


def mrope(q: torch.Tensor, k: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
          positions: torch.Tensor, axes: torch.Tensor):
    """q [N, Hq, D], k [N, Hk, D] rotated by M-RoPE: frequency d of token n at the angle of table
    row positions[axes[d], n] (cos_table, sin_table [L, D], both halves equal; positions [3, N]
    int64 in [0, L); axes [D / 2] int64 in {0, 1, 2}) -> new (q, k), contiguous; differentiable in
    q and k."""
    _check(q, k, cos_table, sin_table, positions, axes)
    if backend_for(q) == "torch":
        return reference.mrope(q, k, cos_table, sin_table, positions, axes)
    return _mrope_op(q, k, cos_table, sin_table, positions, axes)
