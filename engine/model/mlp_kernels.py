"""The gated MLP's SiLU(gate) * up as one Triton kernel, beside its PyTorch form.

Eager, `F.silu(gate) * up` writes SiLU(gate) and reads it back: at a decode step of Qwen2.5-0.5B
(batch 128, MLP 4864) that is 2.4 MiB of a layer's ~45 MiB floor, for nothing. The kernel reads
gate and up once and writes the product. Forward only (generation runs with autograd off); a torch
custom op (fusedrl::silu_mul), so torch.compile and a TorchDispatchMode see one op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...kernels.triton_compat import tl, triton
from .norm_rope import TILE


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
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_rows * n_cols
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    # Rounded to the activation dtype between the two ops, as eager torch's silu then mul.
    silu = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + offs, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(gate, up):
    """SiLU(gate) * up of two contiguous tensors of one shape and dtype -> a new tensor like gate."""
    if gate.shape != up.shape or gate.dtype != up.dtype or not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must be contiguous, of one shape and dtype")
    return torch.ops.fusedrl.silu_mul(gate, up)


@torch.library.custom_op("fusedrl::silu_mul", mutates_args=())
def _silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        n_cols = gate.shape[-1]
        _silu_mul_kernel[(triton.cdiv(n, TILE),)](gate, up, out, n // n_cols, n_cols, BLOCK=TILE)
    return out


@_silu_mul_op.register_fake
def _silu_mul_fake(gate, up):
    return torch.empty_like(gate)


def silu_mul_torch(gate, up):
    """Reference for `silu_mul_triton`: the eager composition transformers runs."""
    return F.silu(gate) * up
