"""The decoder's forward in batch-invariant primitives: the same layers and parameters as
`CausalLM.forward` (embedding, then per layer add + RMSNorm, attention with optional q/k norms and
RoPE, add + RMSNorm, SwiGLU MLP; a final add + RMSNorm), every op taken from one set of
`primitives` and the attention left to the caller (`attend`), which is what differs between the
packed and paged steps.

A separate walk rather than a switch inside every module: the default path keeps its kernels and its
speed untouched, and this one reads as what it is. Embedding lookups and the cos/sin gathers are exact
already.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

# (layer index, q [N, H, D], k [N, Hkv, D], v [N, Hkv, D]) -> attention output [N, H, D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decoder_hidden(model, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend,
                   prims: SimpleNamespace) -> torch.Tensor:
    """input_ids, positions [N] -> final hidden states [N, hidden] of `model` (a CausalLM), each row
    a fixed expression of its own token, position and the keys `attend` hands its attention."""
    x = model.model.embed_tokens(input_ids)
    cos, sin = model.rotary(positions, x.dtype)
    residual = None
    for i, layer in enumerate(model.model.layers):
        h, residual = _add_norm(prims, x, residual, layer.input_layernorm)
        x = _attention(prims, layer.self_attn, h, cos, sin, lambda q, k, v, i=i: attend(i, q, k, v))
        h, residual = _add_norm(prims, x, residual, layer.post_attention_layernorm)
        x = _mlp(prims, layer.mlp, h)
    return _add_norm(prims, x, residual, model.model.norm)[0]


def _add_norm(prims, x, residual, norm):
    """(RMSNorm(x + residual), x + residual); residual None before the first layer."""
    return prims.add_rms_norm(x, residual, norm.weight, norm.eps)


def _linear(prims, layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return prims.linear(x, layer.weight, layer.bias)


def _attention(prims, attn, x, cos, sin, attend):
    n = x.shape[0]
    q = _linear(prims, attn.q_proj, x).view(n, attn.num_heads, attn.head_dim)
    k = _linear(prims, attn.k_proj, x).view(n, attn.num_kv_heads, attn.head_dim)
    v = _linear(prims, attn.v_proj, x).view(n, attn.num_kv_heads, attn.head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3
        q = _add_norm(prims, q, None, attn.q_norm)[0]
        k = _add_norm(prims, k, None, attn.k_norm)[0]
    out = attend(*prims.rope(q, k, cos, sin), v)
    return _linear(prims, attn.o_proj, out.reshape(n, -1))


def _mlp(prims, mlp, x):
    return _linear(prims, mlp.down_proj, prims.silu_mul(_linear(prims, mlp.gate_proj, x), _linear(prims, mlp.up_proj, x)))
