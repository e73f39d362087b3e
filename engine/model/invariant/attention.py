"""Attention of the batch-invariant mode: ONE function, `chunked_attention`, for the packed training
forward and for prefill and decode over the paged KV cache.

Keys are reduced in chunks of `chunk` positions aligned to the sequence start (chunk j holds positions
j*chunk .. j*chunk + chunk - 1): in the paged cache that is exactly page j of the sequence's block table
(chunk = block size), in a packed batch a slice of the sequence. Chunks are visited in order with an
online softmax; inside a chunk, scores and sums are the fixed trees of `ops`. A query's state (running
max, normalizer, accumulator) is updated only by chunks holding at least one of its keys, and masked
keys enter as -inf scores and zero values, so its result is a fixed expression of its own keys: the
same whether it is decoded alone, with 6 other sequences, recomputed after a preemption, prefilled
as part of a prompt or read from a training pack.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import ops

# (chunk index j) -> keys and values [N, chunk, Hkv, D] of positions j*chunk .. of each query's sequence
ChunkSource = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def chunked_attention(q: torch.Tensor, positions: torch.Tensor, chunk_kv: ChunkSource, num_chunks: int,
                      chunk: int) -> torch.Tensor:
    """Causal attention of each query over its sequence's keys 0..position, chunk by chunk.

    q [N, H, D]; positions [N] int64 (a query sees keys at positions <= its own); chunk_kv(j) gives the
    keys and values of chunk j (entries past the query's position may be anything, even NaN: they are
    masked before use); num_chunks covers the largest position. Returns [N, H, D] in q's dtype.
    """
    n, heads, dim = q.shape
    scale = dim ** -0.5
    qf = q.float()[:, :, None, :]  # [N, H, 1, D]
    offsets = torch.arange(chunk, device=q.device)
    m = q.new_full((n, heads), float("-inf"), dtype=torch.float32)
    norm = q.new_zeros((n, heads), dtype=torch.float32)
    acc = q.new_zeros((n, heads, dim), dtype=torch.float32)
    for j in range(num_chunks):
        k, v = chunk_kv(j)
        groups = heads // k.shape[2]
        valid = (j * chunk + offsets)[None, :] <= positions[:, None]  # [N, C]
        kh = k.float().permute(0, 2, 1, 3).repeat_interleave(groups, dim=1)  # [N, H, C, D]
        vh = torch.where(valid[:, :, None, None], v.float(), 0.0).permute(0, 2, 1, 3).repeat_interleave(groups, dim=1)
        scores = (ops.tree_sum(qf * kh, -1) * scale).masked_fill(~valid[:, None, :], float("-inf"))  # [N, H, C]
        m_new = torch.maximum(m, ops.tree_max(scores, -1))
        p = ops.exp(scores - m_new[..., None])
        alpha = ops.exp(m - m_new)
        active = valid[:, :1]  # [N, 1]: the chunk holds a key of this query
        norm = torch.where(active, norm * alpha + ops.tree_sum(p, -1), norm)
        acc = torch.where(active[..., None], acc * alpha[..., None] + ops.tree_sum(p[..., None] * vh, -2), acc)
        m = torch.where(active, m_new, m)
    return (acc / norm[..., None]).to(q.dtype)


def packed_chunks(k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, chunk: int) -> ChunkSource:
    """Chunks of a packed batch: k/v [N, Hkv, D], starts [N] int64 (index of each query's sequence
    start). Indices past the pack are clamped (their keys are masked anyway)."""
    offsets = torch.arange(chunk, device=k.device)

    def chunk_kv(j: int):
        index = (starts[:, None] + j * chunk + offsets[None, :]).clamp(max=k.shape[0] - 1)  # [N, C]
        return k[index], v[index]
    return chunk_kv


def paged_chunks(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 row_seq: torch.Tensor) -> ChunkSource:
    """Chunks from the pages: caches [blocks, block_size, Hkv, D], block_tables [B, width] int32 (-1
    padded), row_seq [N] int64 (the sequence of each query). Chunk j of a query is its page j; table
    entries past the end read block 0 (masked anyway)."""
    width = block_tables.shape[1]

    def chunk_kv(j: int):
        blocks = block_tables[row_seq, min(j, width - 1)].clamp(min=0).long()  # [N]
        return k_cache[blocks], v_cache[blocks]
    return chunk_kv
