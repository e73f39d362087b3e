"""The attention paths over a packed batch: training's varlen attention, a prefill over cached pages
and flash-attn's paged decode, each on the kernel the decider (backend.attention_backend) names.

None of them loops over sequences in Python. What remains, and why each is kept:
- a varlen flash kernel (flash-attn, else torch's `varlen_attn`; see varlen.py) for packed and
  prefill steps on CUDA in fp16/bf16: the fast path, differentiable;
- flash-attn's paged calls (prefill over cached pages, decode) where its page constraint holds: they
  read the pages in place, where the varlen kernel needs the keys gathered first;
- padded SDPA (padded.py), the portable path for packed and prefill steps: a few SDPA calls, one
  per power-of-two length group (no gather at all when every sequence has the same length), and the
  varlen kernels' oracle.
A decode step elsewhere runs `rope_store_decode` (paged.py: RoPE, store and attention in one
launch, or its reference on the "torch" backend).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import attention_backend, flash_attn
from .metadata import AttentionMetadata
from .padded import PaddedPlan, packed_causal_attention, paged_prefill_attention, plan_groups
from .pages import key_slots
from .varlen import torch_varlen_call


def varlen_kernel(q: torch.Tensor):
    """The varlen call (varlen.py's signature) of the kernel the decider names for q, or None where
    the padded SDPA path runs."""
    backend = attention_backend(q)
    if backend == "flash_attn":
        return _flash_attn_call
    if backend == "torch_varlen":
        return torch_varlen_call(q.device, q.dtype)
    return None


def _flash_attn_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale):
    return flash_attn().flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, softmax_scale=scale, causal=True)


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
    # Equal lengths of a power of two (a batch of same-length prompts): a view, no gathers, the
    # padded path's shape; other lengths pad to theirs, as they would in any other batch.
    if len(set(lens)) == 1 and meta.seqlens_k == lens and lens[0] & (lens[0] - 1) == 0:
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
    if attention_backend(q, block_size) == "flash_attn":
        return flash_attn().flash_attn_varlen_func(
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
    out = flash_attn().flash_attn_with_kvcache(
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
