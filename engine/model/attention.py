"""Attention for the three kinds of step; which kernel runs is `kernels.attention_backend`'s answer.

- packed training forward: causal attention inside each sequence of a packed batch, no cache.
- prefill: new tokens of each sequence attend to the cached prefix (shared prompt blocks) and
  themselves; their K/V are written into the pages first.
- decode: one new token per sequence against its pages.

None of them loops over sequences in Python. What remains, and why each is kept:
- a varlen flash kernel (flash-attn, else torch's `varlen_attn`; see varlen_kernels.py) for packed
  and prefill steps on CUDA in fp16/bf16: the fast path, differentiable;
- flash-attn's paged calls (prefill over cached pages, decode) where its page constraint holds: they
  read the pages in place, where the varlen kernel needs the keys gathered first;
- our Triton decode kernel (`kernels.rope_store_decode`: RoPE, store and attention in one launch),
  the decode step elsewhere on CUDA; on the "torch" backend the same op runs its reference (a
  gather);
- padded SDPA (packed_attention.py), the portable path for packed and prefill steps: a few SDPA
  calls, one per power-of-two length group (no gather at all when every sequence has the same
  length), and the varlen kernels' oracle.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ... import kernels
from .kv_pages import key_slots
from .packed_attention import (PaddedPlan, packed_causal_attention, paged_prefill_attention,
                               plan_groups)
from .varlen_kernels import varlen_kernel


@dataclass
class AttentionMetadata:
    """What attention needs to know about the batch, built by the model runner (or the trainer).

    seqlens_q/seqlens_k are host lists (no device sync in loops); the tensors live on the model's
    device. For a packed training batch only `seqlens_q` and `cu_seqlens_q` are set.
    """

    is_decode: bool = False
    seqlens_q: list[int] | None = None  # new tokens per sequence
    seqlens_k: list[int] | None = None  # cached + new tokens per sequence
    cu_seqlens_q: torch.Tensor | None = None  # [B + 1] int32
    cu_seqlens_k: torch.Tensor | None = None  # [B + 1] int32
    slot_mapping: torch.Tensor | None = None  # [N] int64 cache slot of each new token, -1 = skip
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32, -1 padded
    context_lens: torch.Tensor | None = None  # [B] int32 (decode)
    # A packed batch whose segments read keys before their own (prefix sharing: an answer after its
    # group's prompt, engine/model/prefix_sharing.py): [sum seqlens_k] row of each segment's keys.
    key_rows: torch.Tensor | None = None
    # Built on first use by the padded SDPA path and shared by every layer of the forward.
    padded_plan: PaddedPlan | None = field(default=None, repr=False)

    @classmethod
    def packed(cls, seqlens: list[int], device,
               cu_seqlens: torch.Tensor | None = None) -> "AttentionMetadata":
        """Metadata of a packed training batch of sequences with these lengths (cu_seqlens [S + 1]
        int32: their boundaries when already on the device, e.g. a PackedBatch's)."""
        cu = cu_seqlens
        if cu is None:
            cu = torch.tensor([0] + seqlens, device=device, dtype=torch.int32)
            cu = cu.cumsum(0, dtype=torch.int32)
        return cls(seqlens_q=list(seqlens), seqlens_k=list(seqlens), cu_seqlens_q=cu,
                   cu_seqlens_k=cu)

    @classmethod
    def shared(cls, layout) -> "AttentionMetadata":
        """Metadata of a prefix-shared forward (a prefix_sharing.SharedLayout): each segment's
        queries are the last of its keys, read at layout.key_rows."""
        return cls(seqlens_q=layout.seqlens_q, seqlens_k=layout.seqlens_k,
                   cu_seqlens_q=layout.cu_seqlens_q, cu_seqlens_k=layout.cu_seqlens_k,
                   key_rows=layout.key_rows)


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
                meta.slot_mapping, meta.block_tables, meta.context_lens, q.shape[-1] ** -0.5)
        q, k = angles.rotate(q, k)
        kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            return flash_decode_attention(q, k_cache, v_cache, meta)
        return prefill_attention(q, k, v, k_cache, v_cache, meta)
    return attend


def varlen_attention(q, k, v, meta: AttentionMetadata):
    """Causal attention within each sequence of a packed batch (no cache); with meta.key_rows, each
    segment's queries after the keys it reads there (bottom-right causal: a shared prompt's keys,
    then its own), the key gather's backward summing the prompt's gradient over its answers.

    q [N, H, D], k/v [N, Hkv, D] -> [N, H, D]. Differentiable (training forward).
    """
    scale = q.shape[-1] ** -0.5
    if meta.key_rows is not None:
        k, v = (x.index_select(0, meta.key_rows) for x in (k, v))  # [sum Lk, Hkv, D]
    kernel = varlen_kernel(q)
    if kernel is not None:
        return kernel(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, max(meta.seqlens_q),
                      max(meta.seqlens_k), scale)
    lens = meta.seqlens_q
    # Equal lengths (a batch of same-length prompts): a view, no gathers.
    if len(set(lens)) == 1 and meta.seqlens_k == lens:
        # [B, H, L, D]
        batch = [x.unflatten(0, (len(lens), lens[0])).transpose(1, 2) for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*batch, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).flatten(0, 1)
    return packed_causal_attention(q, k, v, _padded_plan(meta, q.device), scale)


def prefill_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata):
    """New tokens attend to their cached prefix and to themselves. K/V must already be stored.

    q [N, H, D], k/v [N, Hkv, D] (the new tokens), caches [num_blocks, block_size, Hkv, D] -> [N, H,
    D].
    """
    if meta.seqlens_q == meta.seqlens_k:  # nothing cached: attend to the fresh K/V directly
        return varlen_attention(q, k, v, meta)
    scale = q.shape[-1] ** -0.5
    block_size = k_cache.shape[1]
    max_q, max_k = max(meta.seqlens_q), max(meta.seqlens_k)
    if kernels.attention_backend(q, block_size) == "flash_attn":
        return kernels.flash_attn().flash_attn_varlen_func(
            q, k_cache, v_cache, meta.cu_seqlens_q, meta.cu_seqlens_k, max_q, max_k,
            softmax_scale=scale, causal=True, block_table=meta.block_tables)
    kernel = varlen_kernel(q)
    if kernel is not None:
        slots = _packed_key_slots(meta, block_size)  # [sum(seqlens_k)]
        keys, values = k_cache.flatten(0, 1)[slots], v_cache.flatten(0, 1)[slots]
        return kernel(q, keys, values, meta.cu_seqlens_q, meta.cu_seqlens_k, max_q, max_k, scale)
    return paged_prefill_attention(q, k_cache, v_cache, meta.block_tables,
                                   _padded_plan(meta, q.device), scale)


def flash_decode_attention(q, k_cache, v_cache, meta: AttentionMetadata):
    """One query token per sequence over its pages by flash-attn's paged call (q and the new K/V
    already rotated and stored): q [B, H, D] -> [B, H, D]."""
    out = kernels.flash_attn().flash_attn_with_kvcache(
        q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.context_lens,
        block_table=meta.block_tables, softmax_scale=q.shape[-1] ** -0.5, causal=True)
    return out.squeeze(1)


def _padded_plan(meta: AttentionMetadata, device) -> PaddedPlan:
    """The padded SDPA path's grouping of this batch, built once per forward."""
    if meta.padded_plan is None:
        meta.padded_plan = plan_groups(meta.seqlens_q, meta.seqlens_k or meta.seqlens_q, device)
    return meta.padded_plan


def _packed_key_slots(meta: AttentionMetadata, block_size: int) -> torch.Tensor:
    """[sum(seqlens_k)] int64 cache slot of every key of every sequence, sequences end to end."""
    total, cu_k = sum(meta.seqlens_k), meta.cu_seqlens_k.long()
    # Sequence of each key; output_size spares repeat_interleave a device sync.
    seq = torch.repeat_interleave(torch.arange(len(meta.seqlens_k), device=cu_k.device),
                                  cu_k.diff(), output_size=total)
    position = torch.arange(total, device=cu_k.device) - cu_k[seq]
    return key_slots(meta.block_tables, seq, position, block_size)
