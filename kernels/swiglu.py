"""The gated MLP's SiLU(gate) * up, forward and backward.

Eager, `F.silu(gate) * up` writes SiLU(gate) and reads it back, and its backward takes ~5 kernels:
at a decode step of Qwen2.5-0.5B (batch 128, MLP 4864) the forward alone wastes 2.4 MiB of a layer's
~45 MiB floor. Forward: one kernel reads gate and up once and writes the product, SiLU rounded to the
activation dtype before the product, as eager torch. Backward: one kernel writes dgate and dup.
The same forward kernel serves decode, scoring and the update.

Backends as every op (kernels/dispatch.py): Triton for CUDA tensors and under TRITON_INTERPRET=1,
`silu_mul_reference` otherwise. Custom ops fusedrl::silu_mul and fusedrl::silu_mul_bwd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import backend_for
from .norm import TILE
from .triton_compat import tl, triton


@triton.jit
def _load_block(gate_ptr, up_ptr, n_elements, BLOCK: tl.constexpr):
    """Offsets, in-range flags, gate in its dtype and gate, up in fp32 of this program's block."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return offs, mask, gate, gate.to(tl.float32), up


# The row count is not specialized on: the same code at batch 1 as in a training pack (the
# batch-invariant mode relies on it). n_rows * n_cols keeps the row width's divisibility, so the
# bound is uniform over 16-element groups and the accesses stay 128 bits wide.
@triton.jit(do_not_specialize=["n_rows"])
def _silu_mul_kernel(
    gate_ptr,  # [n_rows, n_cols] contiguous
    up_ptr,  # [n_rows, n_cols] contiguous
    out_ptr,  # [n_rows, n_cols] out
    n_rows,
    n_cols,
    BLOCK: tl.constexpr,
):
    offs, mask, gate, g, up = _load_block(gate_ptr, up_ptr, n_rows * n_cols, BLOCK)
    # Rounded to the activation dtype between the two ops, as eager torch's silu then mul.
    silu = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + offs, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _silu_mul_bwd_kernel(
    grad_out_ptr,  # [n_rows, n_cols] contiguous
    gate_ptr,
    up_ptr,
    grad_gate_ptr,  # [n_rows, n_cols] out
    grad_up_ptr,  # [n_rows, n_cols] out
    n_rows,
    n_cols,
    BLOCK: tl.constexpr,
):
    offs, mask, gate, g, up = _load_block(gate_ptr, up_ptr, n_rows * n_cols, BLOCK)
    dout = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = (g * sig).to(gate.dtype).to(tl.float32)  # the factor the forward multiplied up by
    tl.store(grad_up_ptr + offs, (dout * silu).to(grad_up_ptr.dtype.element_ty), mask=mask)
    # d silu / dg = sig * (1 + g * (1 - sig))
    grad_gate = dout * up * sig * (1.0 + g * (1.0 - sig))
    tl.store(grad_gate_ptr + offs, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=mask)


def _grid(t: torch.Tensor):
    return (triton.cdiv(t.numel(), TILE),)


@torch.library.custom_op("fusedrl::silu_mul", mutates_args=())
def _silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate)
    if gate.numel():
        n_cols = gate.shape[-1]
        _silu_mul_kernel[_grid(gate)](gate, up, out, gate.numel() // n_cols, n_cols, BLOCK=TILE)
    return out


@_silu_mul_op.register_fake
def _silu_mul_fake(gate, up):
    return torch.empty_like(gate)


@torch.library.custom_op("fusedrl::silu_mul_bwd", mutates_args=())
def _silu_mul_bwd_op(grad_out: torch.Tensor, gate: torch.Tensor,
                     up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    if gate.numel():
        n_cols = gate.shape[-1]
        _silu_mul_bwd_kernel[_grid(gate)](grad_out.contiguous(), gate, up, grad_gate, grad_up,
                                          gate.numel() // n_cols, n_cols, BLOCK=TILE)
    return grad_gate, grad_up


@_silu_mul_bwd_op.register_fake
def _silu_mul_bwd_fake(grad_out, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    return _silu_mul_bwd_op(grad_out, gate, up)


_silu_mul_op.register_autograd(_backward, setup_context=_setup)


def silu_mul_reference(gate, up):
    """The eager composition transformers runs."""
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of two contiguous tensors of one shape and dtype -> a new tensor like gate;
    differentiable in both."""
    if gate.shape != up.shape or gate.dtype != up.dtype or not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must be contiguous, of one shape and dtype")
    if backend_for(gate) == "torch":
        return silu_mul_reference(gate, up)
    return _silu_mul_op(gate, up)
