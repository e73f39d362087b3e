"""Attention for the three kinds of step, each with its backend chosen here and nowhere else.

- packed training forward: causal attention inside each sequence of a packed batch, no cache.
- prefill: new tokens of each sequence attend to the cached prefix (shared prompt blocks) and
  themselves; their K/V are written into the pages first.
- decode: one new token per sequence against its pages.

flash-attn is used when it is installed, on CUDA, for fp16/bf16 (its only dtypes); its paged calls take
a block table only when the block size is a multiple of 256 (flash-attn 2's page constraint), so other
block sizes use our Triton decode kernel. Without CUDA, everything is PyTorch (SDPA and gathers)
unless kernels' backend override asks for Triton.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import paged_kernels
from ...kernels.dispatch import backend_for, requested_backend

FLASH_PAGE_MULTIPLE = 256
# Packs up to this many tokens attend in one SDPA call with an [N, N] mask (at most 4 MiB of bools).
DENSE_PACK_TOKENS = 2048


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

    @classmethod
    def packed(cls, seqlens: list[int], device) -> "AttentionMetadata":
        """Metadata of a packed training batch of sequences with these lengths."""
        cu = torch.tensor([0] + seqlens, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return cls(seqlens_q=list(seqlens), seqlens_k=list(seqlens), cu_seqlens_q=cu, cu_seqlens_k=cu)


@functools.cache
def _flash_attn():
    """The flash_attn module, or None when it is not installed."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    import flash_attn
    return flash_attn


def _use_flash(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _flash_attn() is not None


def use_triton(x: torch.Tensor) -> bool:
    """Our Triton kernels on CUDA. Elsewhere only when asked for with kernels' backend override
    (`kernels.use_backend("triton")` or FUSEDRL_BACKEND=triton; on the CPU that needs
    TRITON_INTERPRET=1), which is how the tests run whole generations through the kernels."""
    if requested_backend() == "auto":
        return x.is_cuda
    return backend_for(x) == "triton"


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write new K/V [N, Hkv, D] into the pages at `slot_mapping`."""
    if use_triton(k):
        paged_kernels.store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        paged_kernels.store_kv_torch(k, v, k_cache, v_cache, slot_mapping)


def varlen_attention(q, k, v, meta: AttentionMetadata):
    """Causal attention within each sequence of a packed batch (no cache).

    q [N, H, D], k/v [N, Hkv, D] -> [N, H, D]. Differentiable (training forward).
    """
    scale = q.shape[-1] ** -0.5
    if _use_flash(q):
        max_len = max(meta.seqlens_q)
        return _flash_attn().flash_attn_varlen_func(
            q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_q, max_len, max_len, softmax_scale=scale,
            causal=True)
    lens = meta.seqlens_q
    if len(set(lens)) == 1:  # equal lengths (e.g. a batch of same-length prompts): one batched call
        return _sdpa(*(x.unflatten(0, (len(lens), lens[0])) for x in (q, k, v)), scale).flatten(0, 1)
    if q.shape[0] <= DENSE_PACK_TOKENS:
        # A small pack of many short sequences (RL rollouts): one call with a block-diagonal causal
        # mask beats a Python loop of tiny calls, forward and backward (measured on 2 CPU cores:
        # ~2x for 60 sequences of 1-15 tokens).
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=_block_causal_mask(lens, q.device), scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)
    # Otherwise one SDPA call per sequence: no [N, N] block-diagonal mask to build.
    outs = [_sdpa(qi[None], ki[None], vi[None], scale)[0]
            for qi, ki, vi in zip(q.split(lens), k.split(lens), v.split(lens))]
    return torch.cat(outs)


def prefill_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata):
    """New tokens attend to their cached prefix and to themselves. K/V must already be stored.

    q [N, H, D], k/v [N, Hkv, D] (the new tokens), caches [num_blocks, block_size, Hkv, D].
    """
    if meta.seqlens_q == meta.seqlens_k:  # nothing cached: attend to the fresh K/V directly
        return varlen_attention(q, k, v, meta)
    scale = q.shape[-1] ** -0.5
    block_size = k_cache.shape[1]
    if _use_flash(q) and block_size % FLASH_PAGE_MULTIPLE == 0:
        return _flash_attn().flash_attn_varlen_func(
            q, k_cache, v_cache, meta.cu_seqlens_q, meta.cu_seqlens_k, max(meta.seqlens_q),
            max(meta.seqlens_k), softmax_scale=scale, causal=True, block_table=meta.block_tables)
    outs = []
    for i, (qi, len_k) in enumerate(zip(q.split(meta.seqlens_q), meta.seqlens_k)):
        blocks = meta.block_tables[i, : -(-len_k // block_size)].long()
        ki = k_cache[blocks].flatten(0, 1)[:len_k]  # [len_k, Hkv, D]
        vi = v_cache[blocks].flatten(0, 1)[:len_k]
        outs.append(_sdpa(qi[None], ki[None], vi[None], scale)[0])
    return torch.cat(outs)


def decode_attention(q, k_cache, v_cache, meta: AttentionMetadata):
    """One query token per sequence over its pages: q [B, H, D] -> [B, H, D]."""
    scale = q.shape[-1] ** -0.5
    if _use_flash(q) and k_cache.shape[1] % FLASH_PAGE_MULTIPLE == 0:
        out = _flash_attn().flash_attn_with_kvcache(
            q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.context_lens,
            block_table=meta.block_tables, softmax_scale=scale, causal=True)
        return out.squeeze(1)
    if use_triton(q):
        return paged_kernels.paged_decode_triton(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
    return paged_kernels.paged_decode_torch(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)


def _block_causal_mask(lens: list[int], device) -> torch.Tensor:
    """[N, N] bool: token i attends to token j iff both are in the same sequence and j <= i."""
    seq = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))
    pos = torch.arange(seq.shape[0], device=device)
    return (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])


def _sdpa(q, k, v, scale):
    """Causal SDPA of sequences whose Lq queries are the last of their Lk keys.

    q [B, Lq, H, D], k/v [B, Lk, Hkv, D] -> [B, Lq, H, D].
    """
    len_q, len_k = q.shape[1], k.shape[1]
    mask = None
    if len_q != len_k:  # queries sit at the end: bottom-right aligned causal mask
        rows = torch.arange(len_q, device=q.device)[:, None] + (len_k - len_q)
        mask = torch.arange(len_k, device=q.device)[None, :] <= rows
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=mask is None, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)
