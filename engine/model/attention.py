"""Attention for the three kinds of step, each with its backend chosen here and nowhere else.

- packed training forward: causal attention inside each sequence of a packed batch, no cache.
- prefill: new tokens of each sequence attend to the cached prefix (shared prompt blocks) and
  themselves; their K/V are written into the pages first.
- decode: one new token per sequence against its pages.

None of them loops over sequences in Python. On CUDA in fp16/bf16 the packed and prefill steps run one
varlen flash-attention call (flash-attn when installed, else torch's `varlen_attn`; see
varlen_kernels.py); prefill reads the pages through flash-attn's block table when the block size is a
multiple of 256 (flash-attn 2's page constraint), and otherwise gathers each sequence's keys from the
pages with one index first. Elsewhere (the CPU, fp32) packed_attention.py runs a few padded SDPA calls,
as many as there are power-of-two length groups. Decode uses flash-attn's paged call under the same
block-size condition, else, where kernels.dispatch.fused_for_model says so (CUDA, or the CPU when
kernels' backend override asks for Triton), one Triton launch that rotates q and k, stores the new K/V
and attends (kernels.paged_attention.rope_store_decode_triton), else a PyTorch gather.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...kernels import paged_attention
from .kv_pages import key_slots
from .packed_attention import PaddedPlan, packed_causal_attention, paged_prefill_attention, plan_groups
from .varlen_kernels import flash_attn, use_flash_attn, varlen_kernel
from ...kernels.dispatch import fused_for_model

FLASH_PAGE_MULTIPLE = 256


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
    # Built on first use by the padded SDPA path and shared by every layer of the forward.
    padded_plan: PaddedPlan | None = field(default=None, repr=False)

    @classmethod
    def packed(cls, seqlens: list[int], device, cu_seqlens: torch.Tensor | None = None) -> "AttentionMetadata":
        """Metadata of a packed training batch of sequences with these lengths (cu_seqlens [S + 1]
        int32: their boundaries when already on the device, e.g. a PackedBatch's)."""
        cu = cu_seqlens
        if cu is None:
            cu = torch.tensor([0] + seqlens, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return cls(seqlens_q=list(seqlens), seqlens_k=list(seqlens), cu_seqlens_q=cu, cu_seqlens_k=cu)


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write new K/V [N, Hkv, D] into the pages at `slot_mapping`."""
    paged_attention.store_kv(k, v, k_cache, v_cache, slot_mapping)


def attention_step(meta: AttentionMetadata, kv_caches=None):
    """The decoder walk's attention for one forward: (layer index, q [N, H, D], k/v [N, Hkv, D]
    before RoPE, the forward's RotaryAngles) -> [N, H, D]. kv_caches: per layer (k_cache, v_cache) for
    a prefill or decode step (new K/V are stored first), or None for a packed training batch. Where
    the Triton kernels run, a decode step's RoPE, store and attention are one launch."""
    def attend(layer: int, q, k, v, angles):
        if kv_caches is not None and meta.is_decode and _fused_decode(q, kv_caches[layer][0]):
            k_cache, v_cache = kv_caches[layer]
            return paged_attention.rope_store_decode_triton(
                q, k, v, angles.cos_table, angles.sin_table, angles.positions, k_cache, v_cache,
                meta.slot_mapping, meta.block_tables, meta.context_lens, q.shape[-1] ** -0.5)
        q, k = angles.rotate(q, k)
        if kv_caches is None:
            return varlen_attention(q, k, v, meta)
        k_cache, v_cache = kv_caches[layer]
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            return decode_attention(q, k_cache, v_cache, meta)
        return prefill_attention(q, k, v, k_cache, v_cache, meta)
    return attend


def varlen_attention(q, k, v, meta: AttentionMetadata):
    """Causal attention within each sequence of a packed batch (no cache).

    q [N, H, D], k/v [N, Hkv, D] -> [N, H, D]. Differentiable (training forward).
    """
    scale = q.shape[-1] ** -0.5
    kernel = varlen_kernel(q)
    if kernel is not None:
        max_len = max(meta.seqlens_q)
        return kernel(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_q, max_len, max_len, scale)
    lens = meta.seqlens_q
    if len(set(lens)) == 1:  # equal lengths (a batch of same-length prompts): a view, no gathers
        batch = [x.unflatten(0, (len(lens), lens[0])).transpose(1, 2) for x in (q, k, v)]  # [B, H, L, D]
        out = F.scaled_dot_product_attention(*batch, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).flatten(0, 1)
    return packed_causal_attention(q, k, v, _padded_plan(meta, q.device), scale)


def prefill_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata):
    """New tokens attend to their cached prefix and to themselves. K/V must already be stored.

    q [N, H, D], k/v [N, Hkv, D] (the new tokens), caches [num_blocks, block_size, Hkv, D] -> [N, H, D].
    """
    if meta.seqlens_q == meta.seqlens_k:  # nothing cached: attend to the fresh K/V directly
        return varlen_attention(q, k, v, meta)
    scale = q.shape[-1] ** -0.5
    block_size = k_cache.shape[1]
    max_q, max_k = max(meta.seqlens_q), max(meta.seqlens_k)
    if use_flash_attn(q) and block_size % FLASH_PAGE_MULTIPLE == 0:
        return flash_attn().flash_attn_varlen_func(
            q, k_cache, v_cache, meta.cu_seqlens_q, meta.cu_seqlens_k, max_q, max_k,
            softmax_scale=scale, causal=True, block_table=meta.block_tables)
    kernel = varlen_kernel(q)
    if kernel is not None:
        slots = _packed_key_slots(meta, block_size)  # [sum(seqlens_k)]
        keys, values = k_cache.flatten(0, 1)[slots], v_cache.flatten(0, 1)[slots]
        return kernel(q, keys, values, meta.cu_seqlens_q, meta.cu_seqlens_k, max_q, max_k, scale)
    return paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, _padded_plan(meta, q.device), scale)


def _fused_decode(q, k_cache) -> bool:
    """Whether a decode step runs RoPE + store + our paged kernel as one launch (not flash-attn's call)."""
    return fused_for_model(q) and not (use_flash_attn(q) and k_cache.shape[1] % FLASH_PAGE_MULTIPLE == 0)


def decode_attention(q, k_cache, v_cache, meta: AttentionMetadata):
    """One query token per sequence over its pages, where the fused step does not run (flash-attn's
    paged call, or the PyTorch gather): q [B, H, D] -> [B, H, D]."""
    scale = q.shape[-1] ** -0.5
    if use_flash_attn(q) and k_cache.shape[1] % FLASH_PAGE_MULTIPLE == 0:
        out = flash_attn().flash_attn_with_kvcache(
            q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.context_lens,
            block_table=meta.block_tables, softmax_scale=scale, causal=True)
        return out.squeeze(1)
    return paged_attention.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)


def _padded_plan(meta: AttentionMetadata, device) -> PaddedPlan:
    """The padded SDPA path's grouping of this batch, built once per forward."""
    if meta.padded_plan is None:
        meta.padded_plan = plan_groups(meta.seqlens_q, meta.seqlens_k or meta.seqlens_q, device)
    return meta.padded_plan


def _packed_key_slots(meta: AttentionMetadata, block_size: int) -> torch.Tensor:
    """[sum(seqlens_k)] int64 cache slot of every key of every sequence, sequences end to end."""
    total, cu_k = sum(meta.seqlens_k), meta.cu_seqlens_k.long()
    # Sequence of each key; output_size spares repeat_interleave a device sync.
    seq = torch.repeat_interleave(torch.arange(len(meta.seqlens_k), device=cu_k.device), cu_k.diff(),
                                  output_size=total)
    position = torch.arange(total, device=cu_k.device) - cu_k[seq]
    return key_slots(meta.block_tables, seq, position, block_size)
