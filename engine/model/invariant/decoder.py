"""The decoder's forward in fixed-order ops: the same layers and parameters as `CausalLM.forward`
(embedding, then per layer add + RMSNorm, attention with optional q/k norms and RoPE, add + RMSNorm,
SwiGLU MLP; a final add + RMSNorm), with every reduction and transcendental op from `ops` and the
attention left to the caller (`attend`), which is what differs between the packed and paged steps.

A separate walk rather than a switch inside every module: the default path keeps its fused kernels
and its speed untouched, and this one reads as what it is. Embedding lookups, residual adds and RoPE
(`rope_torch`: multiplies and adds of the cached cos/sin rows) are exact elementwise ops already.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..norm_rope import rope_torch
from . import ops

# (layer index, q [N, H, D], k [N, Hkv, D], v [N, Hkv, D]) -> attention output [N, H, D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decoder_hidden(model, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
    """input_ids, positions [N] -> final hidden states [N, hidden] of `model` (a CausalLM), each row
    a fixed expression of its own token, position and the keys `attend` hands its attention."""
    x = model.model.embed_tokens(input_ids)
    cos, sin = model.rotary(positions, x.dtype)
    residual = None
    for i, layer in enumerate(model.model.layers):
        h, residual = _add_norm(x, residual, layer.input_layernorm)
        x = _attention(layer.self_attn, h, cos, sin, lambda q, k, v, i=i: attend(i, q, k, v))
        h, residual = _add_norm(x, residual, layer.post_attention_layernorm)
        x = _mlp(layer.mlp, h)
    return _add_norm(x, residual, model.model.norm)[0]


def _add_norm(x, residual, norm):
    """(RMSNorm(x + residual), x + residual); residual None before the first layer."""
    if residual is not None:
        x = residual + x
    return ops.rms_norm(x, norm.weight, norm.eps), x


def _linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return ops.linear(x, layer.weight, layer.bias)


def _attention(attn, x, cos, sin, attend):
    n = x.shape[0]
    q = _linear(attn.q_proj, x).view(n, attn.num_heads, attn.head_dim)
    k = _linear(attn.k_proj, x).view(n, attn.num_kv_heads, attn.head_dim)
    v = _linear(attn.v_proj, x).view(n, attn.num_kv_heads, attn.head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3
        q = ops.rms_norm(q, attn.q_norm.weight, attn.q_norm.eps)
        k = ops.rms_norm(k, attn.k_norm.weight, attn.k_norm.eps)
    out = attend(rope_torch(q, cos, sin), rope_torch(k, cos, sin), v)
    return _linear(attn.o_proj, out.reshape(n, -1))


def _mlp(mlp, x):
    return _linear(mlp.down_proj, ops.silu(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))
