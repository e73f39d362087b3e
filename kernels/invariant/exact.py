"""The exact (batch-invariant) mode's ops, public as `fusedrl.kernels.exact`: each computes a row's
result in an order that does not depend on the other rows of the batch, so a token's log-prob is the
same bits in the sampler and in the trainer's forward. Each op asks the decider once
(`dispatch.model_backend`):

- "triton" (CUDA, or CPU tensors asked for by name under TRITON_INTERPRET=1): the fixed-tile matmul
  and the per-row log-softmax of this package, and the fused RMSNorm, RoPE and SiLU*up kernels (one
  program's arithmetic per row or element, its tiles fixed by the row width: invariant as they
  are);
- "torch" (elsewhere): `fixed_order`'s trees of elementwise torch ops.
`attention` is attention.py's `exact_attention`, which makes the same choice between its segment
kernel and its page-by-page torch reduction.

The two backends agree to rounding, not bit for bit (nor need to): sampler and trainer run on one
device, so on one backend. Every op keeps its arguments' meaning on both.
"""
from __future__ import annotations

import torch

from ..dispatch import fused_for_model
from ..model.norm import rms_norm
from .. import reference
from ..model.rotary import rope as fused_rope
from ..model.swiglu import silu_mul as fused_silu_mul
from .attention import exact_attention as attention
from . import fixed_order
from .fixed_tile_matmul import linear_fixed_tiles
from .row_logprobs import row_logprobs as fused_row_logprobs

__all__ = ["linear", "add_rms_norm", "rope", "silu_mul", "attention", "row_logprobs"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [N, K] @ weight [O, K].T (+ bias [O]) -> [N, O] in out_dtype (default x's), fp32
    accumulation."""
    if fused_for_model(x):
        return linear_fixed_tiles(x, weight, bias, out_dtype)
    return fixed_order.linear(x, weight, bias, out_dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(RMSNorm(x + residual), x + residual) over the last dim of x [..., C]; residual None:
    (RMSNorm(x), x)."""
    if fused_for_model(x):
        return ((rms_norm(x, weight, eps), x) if residual is None
                else rms_norm(x, weight, eps, residual))
    if residual is not None:
        x = residual + x
    return fixed_order.rms_norm(x, weight, eps), x


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [N, H, D], k [N, Hkv, D] rotated by cos/sin [N, D] -> (q, k): elementwise IEEE arithmetic,
    invariant on either backend as it is."""
    if fused_for_model(q):
        return fused_rope(q, k, cos, sin)
    return reference.rope(q, k, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of gate_up [..., 2C] (gate first) -> [..., C]."""
    if fused_for_model(gate_up):
        return fused_silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return fixed_order.silu(gate) * up


def row_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperatures: torch.Tensor):
    """logits [R, V] fp32, tokens [R] int64, temperatures [R] fp32 > 0 -> (log softmax(logits /
    T)[token], entropy of softmax(logits / T)), both fp32 [R]."""
    if fused_for_model(logits):
        return fused_row_logprobs(logits, tokens, temperatures)
    return fixed_order.token_logprobs(logits, tokens, temperatures, True)
