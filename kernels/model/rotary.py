"""Rotary position embedding of q and k in one launch, forward and backward.

Rotate-half convention, transformers' op order: out = x * cos + rotate_half(x) * sin with
rotate_half(x) = (-x2, x1), computed in fp32 and rounded once. The rotation is orthogonal, so the
backward is the same kernel with the angle negated (sin -> -sin): one launch for dq and dk too.
Eager PyTorch spends ~5 kernels per tensor each way. The same forward kernel serves decode, scoring
and the update.

Backends as every op (kernels/dispatch.py): Triton for CUDA tensors and under TRITON_INTERPRET=1,
`reference.rope` otherwise. Custom ops fusedrl::rope and fusedrl::rope_bwd.
"""
from __future__ import annotations

import torch

from .. import checks, reference
from ..dispatch import backend_for
from .norm import rows_per_program
from ..triton_compat import tl, triton
from ..direct_ops import direct_op


@triton.jit
def _rotate_rows(x_ptr, out_ptr, cos_ptr, sin_ptr, first_row, n_rows, heads, row_stride,
                 head_stride, HALF: tl.constexpr, HALF_PAD: tl.constexpr, ROWS: tl.constexpr,
                 BACKWARD: tl.constexpr):
    """Rotate (token, head) rows [first_row, first_row + ROWS) of x [N, heads, D] into out
    (contiguous)."""
    r = first_row + tl.arange(0, ROWS).to(tl.int64)
    token = r // heads
    head = r - token * heads
    d = tl.arange(0, HALF_PAD)
    mask = (r[:, None] < n_rows) & (d[None, :] < HALF)
    x_off = (token * row_stride + head * head_stride)[:, None] + d[None, :]
    out_off = (r * 2 * HALF)[:, None] + d[None, :]
    cs_off = (token * 2 * HALF)[:, None] + d[None, :]
    rotate_at(x_ptr, out_ptr, cos_ptr, sin_ptr, x_off, out_off, cs_off, mask, HALF, BACKWARD)


@triton.jit
def rotate_at(x_ptr, out_ptr, cos_ptr, sin_ptr, x_off, out_off, cs_off, mask, HALF: tl.constexpr,
              BACKWARD: tl.constexpr):
    """Rotate the rows whose first halves are at x_ptr + x_off (second halves HALF further) by the
    table angles at cos_ptr/sin_ptr + cs_off into out_ptr + out_off: x * cos + rotate_half(x) * sin
    in fp32, rounded once (BACKWARD: by the opposite angle). Also M-RoPE's (mrope.py)."""
    x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + cs_off, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + cs_off, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of a rotation is the rotation by the opposite angle
        sin = -sin
    tl.store(out_ptr + out_off, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + out_off + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty),
             mask=mask)


# Token counts are not specialized on: the same code at batch 1 as in a training pack (the
# batch-invariant mode relies on it).
@triton.jit(do_not_specialize=["n_tokens", "q_programs"])
def _rope_kernel(
    q_ptr,  # [N, Hq, D] (last dim contiguous)
    k_ptr,  # [N, Hk, D]
    q_out_ptr,  # [N, Hq, D] contiguous out
    k_out_ptr,  # [N, Hk, D] contiguous out
    cos_ptr,  # [N, D] cos of each token's position (both halves equal)
    sin_ptr,  # [N, D]
    n_tokens,  # N
    q_heads,
    k_heads,
    q_row_stride,  # elements between tokens of q
    q_head_stride,  # elements between heads of q
    k_row_stride,
    k_head_stride,
    q_programs,  # programs 0..q_programs-1 rotate q, the rest k
    HALF: tl.constexpr,  # D / 2
    HALF_PAD: tl.constexpr,  # HALF rounded up to a power of two
    ROWS: tl.constexpr,  # (token, head) rows per program
    BACKWARD: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < q_programs:
        _rotate_rows(q_ptr, q_out_ptr, cos_ptr, sin_ptr, pid.to(tl.int64) * ROWS,
                     n_tokens * q_heads, q_heads, q_row_stride, q_head_stride, HALF, HALF_PAD, ROWS,
                     BACKWARD)
    else:
        _rotate_rows(k_ptr, k_out_ptr, cos_ptr, sin_ptr, (pid - q_programs).to(tl.int64) * ROWS,
                     n_tokens * k_heads, k_heads, k_row_stride, k_head_stride, HALF, HALF_PAD, ROWS,
                     BACKWARD)


def _launch(q, k, cos, sin, backward: bool):
    n, q_heads, dim = q.shape
    k_heads = k.shape[1]
    half_pad = triton.next_power_of_2(dim // 2)
    rows = rows_per_program(half_pad)  # each row is loaded as two halves
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    q_programs = triton.cdiv(n * q_heads, rows)
    programs = q_programs + triton.cdiv(n * k_heads, rows)
    if programs:
        _rope_kernel[(programs,)](
            q, k, q_out, k_out, cos, sin, n, q_heads, k_heads, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), q_programs, HALF=dim // 2, HALF_PAD=half_pad, ROWS=rows,
            BACKWARD=backward)
    return q_out, k_out


@direct_op("fusedrl::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, cos, sin, backward=False)


@_rope_op.register_fake
def _rope_fake(q, k, cos, sin):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype,
                                                                             device=k.device)


@direct_op("fusedrl::rope_bwd", mutates_args=())
def _rope_bwd_op(grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(grad_q, grad_k, cos, sin, backward=True)


@_rope_bwd_op.register_fake
def _rope_bwd_fake(grad_q, grad_k, cos, sin):
    return _rope_fake(grad_q, grad_k, cos, sin)


def _rope_setup(ctx, inputs, output):
    _, _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    # Gradients may arrive with any strides; the kernel reads rows through strides but needs a
    # contiguous last dim.
    grad_q, grad_k = (g if g.stride(-1) == 1 else g.contiguous() for g in (grad_q, grad_k))
    dq, dk = _rope_bwd_op(grad_q, grad_k, cos, sin)
    return dq, dk, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


def _check(q, k, cos, sin):
    for name, tensor in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        checks.check_float("rope", name, tensor)
    if (q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]
        or q.shape[2] % 2):
        raise ValueError(
            f"rope: q [N, Hq, D] and k [N, Hk, D] with one N and an even D expected, got q "
            f"{tuple(q.shape)} and k {tuple(k.shape)}")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError(
            f"rope: the last dim of q and k must be contiguous, got strides {q.stride()} and "
            f"{k.stride()}")
    expected = (q.shape[0], q.shape[2])
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != expected or not t.is_contiguous():
            raise ValueError(f"rope: {name} must be contiguous [{expected[0]}, {expected[1]}], got "
                             f"{tuple(t.shape)} with strides {t.stride()}")


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [N, Hq, D], k [N, Hk, D] rotated by the angles of cos/sin [N, D] -> new (q, k), contiguous;
    differentiable in q and k."""
    _check(q, k, cos, sin)
    if backend_for(q) == "torch":
        return reference.rope(q, k, cos, sin)
    return _rope_op(q, k, cos, sin)
