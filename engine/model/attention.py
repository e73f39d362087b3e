"""The decoder walk's attention for the three kinds of step; the paths and the choice of kernel are
`fusedrl.kernels.attention`'s (its decider: `attention_backend`).

- packed training forward: causal attention inside each sequence of a packed batch, no cache
  (`varlen_attention`).
- prefill: new tokens of each sequence attend to the cached prefix (shared prompt blocks) and
  themselves; their K/V are written into the pages first (`prefill_attention`).
- decode: one new token per sequence against its pages: RoPE, store and attention in one op
  (`rope_store_decode`), unless flash-attn reads the pages (`flash_decode_attention`).
"""
from __future__ import annotations

from ... import kernels
from ...kernels.attention import (AttentionMetadata, flash_decode_attention, prefill_attention,
                                  varlen_attention)


def attention_step(meta: AttentionMetadata, kv_caches=None):
    """The decoder walk's attention for one forward: (layer index, q [N, H, D], k/v [N, Hkv, D]
    before RoPE, the forward's RotaryAngles) -> [N, H, D]. kv_caches: per layer (k_cache, v_cache)
    for a prefill or decode step (new K/V are stored first), or None for a packed training batch. A
    decode step's RoPE, store and attention are one op, unless flash-attn reads the pages."""
    def attend(layer: int, q, k, v, angles):
        if kv_caches is None:
            return varlen_attention(*angles.rotate(q, k), v, meta)
        k_cache, v_cache = kv_caches[layer]
        flash = kernels.attention_backend(q, k_cache.shape[1]) == "flash_attn"
        if meta.is_decode and not flash:
            return kernels.rope_store_decode(
                q, k, v, angles.cos_table, angles.sin_table, angles.positions, k_cache, v_cache,
                meta.slot_mapping, meta.block_tables, meta.context_lens, q.shape[-1] ** -0.5,
                meta.decode_splits)
        q, k = angles.rotate(q, k)
        kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            return flash_decode_attention(q, k_cache, v_cache, meta)
        return prefill_attention(q, k, v, k_cache, v_cache, meta)
    return attend
