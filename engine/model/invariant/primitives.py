"""The batch-invariant mode's primitives, one set per place they run, chosen by the tensors' device.

- `FIXED_ORDER_TORCH` (the CPU): `ops`' fixed trees of elementwise torch ops and `chunked_attention`.
- `TRITON` (CUDA, and CPU tensors where kernels' backend override asks for Triton under
  TRITON_INTERPRET=1, which is how the tests run this path without a GPU): the fixed-tile matmul, the
  fused RMSNorm, RoPE and SiLU*up kernels of fusedrl.kernels (one program's arithmetic per row or
  element, its tiles fixed by the row width: invariant as they are), the segment attention kernel
  and the per-row log-softmax.

The sampler and the trainer run on one device and so get the same set; the two sets are not bitwise
equal to each other (nor need to be). Every function keeps its arguments' meaning across the sets.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ..primitives import FUSED, composed_norm_linear, fused_add_rms_norm
from ....kernels.dispatch import fused_for_model
from ....kernels import reference
from . import ops
from .attention import chunked_attention
from ....kernels.invariant.segment_attention import segment_attention
from ....kernels.invariant.row_logprobs import row_logprobs
from ....kernels.invariant.fixed_tile_matmul import linear_fixed_tiles


def _torch_add_rms_norm(x, residual, weight, eps):
    if residual is not None:
        x = residual + x
    return ops.rms_norm(x, weight, eps), x


def _fixed_order_silu_mul(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return ops.silu(gate) * up


def _torch_attention(q, k_rows, v_rows, positions, seq_index, page_table, page, segment, max_position):
    return chunked_attention(q, k_rows, v_rows, positions, seq_index, page_table, page)


# The fields of the decoder's sets (..primitives), plus attention and row_logprobs.
FIXED_ORDER_TORCH = SimpleNamespace(
    # x [N, K], weight [O, K], bias [O] or None -> [N, O] in out_dtype (default x's)
    linear=ops.linear,
    add_rms_norm=_torch_add_rms_norm,
    rope=reference.rope,
    silu_mul=_fixed_order_silu_mul,
    # (q, k_rows, v_rows, positions, seq_index, page_table, page, segment, max_position) -> [N, H, D]
    attention=_torch_attention,
    # (logits [R, V] fp32, tokens [R], temperatures [R]) -> (logp [R], entropy [R])
    row_logprobs=lambda logits, tokens, temperatures: ops.token_logprobs(logits, tokens, temperatures, True),
    norm_linear=composed_norm_linear,
)

TRITON = SimpleNamespace(
    linear=linear_fixed_tiles,
    add_rms_norm=fused_add_rms_norm,
    rope=FUSED.rope,
    silu_mul=FUSED.silu_mul,
    attention=segment_attention,
    row_logprobs=row_logprobs,
    norm_linear=composed_norm_linear,
)


def primitives_for(x: torch.Tensor) -> SimpleNamespace:
    """The set for tensors like `x`: TRITON where the engine runs its Triton kernels, else FIXED_ORDER_TORCH."""
    return TRITON if fused_for_model(x) else FIXED_ORDER_TORCH
