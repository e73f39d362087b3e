"""Attention of the batch-invariant mode on the CPU: `chunked_attention`, one function for the
packed training forward and for prefill and decode over the paged KV cache (on GPUs the Triton
kernel of segment_attention.py plays its part, with the same arguments).

Both read keys through a page table of key rows: position p of a query's sequence is row
`page_table[seq, p // page] + p % page` of k_rows / v_rows. For the paged cache that is
`block_tables * page` over the cache flattened to rows, for a training pack `start + j * page` over
the packed keys. Keys are reduced page by page (chunk j = positions j*page .. j*page + page - 1)
with an online softmax; inside a page, scores and sums are the fixed trees of `ops`. A query's state
(running max, normalizer, accumulator) is updated only by pages holding at least one of its keys,
and masked keys enter as -inf scores and zero values, so its result is a fixed expression of its own
keys: the same whether it is decoded alone, with 6 other sequences, recomputed after a preemption,
prefilled as part of a prompt or read from a training pack.
"""
from __future__ import annotations

import torch

from . import fixed_order as ops


def chunked_attention(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                      positions: torch.Tensor, seq_index: torch.Tensor, page_table: torch.Tensor,
                      page: int) -> torch.Tensor:
    """Causal attention of each query over its sequence's keys 0..position, page by page.

    q [N, H, D]; k_rows, v_rows [rows, Hkv, D]; positions, seq_index [N] int64 (a query sees keys at
    positions <= its own, of the sequence in row seq_index of page_table); page_table [S, W] int
    (W pages cover the largest position; rows a query never reaches may hold anything, even NaN:
    they are masked before use). Returns [N, H, D] in q's dtype.
    """
    n, heads, dim = q.shape
    scale = dim ** -0.5
    qf = q.float()[:, :, None, :]  # [N, H, 1, D]
    offsets = torch.arange(page, device=q.device)
    groups = heads // k_rows.shape[1]
    m = q.new_full((n, heads), float("-inf"), dtype=torch.float32)
    norm = q.new_zeros((n, heads), dtype=torch.float32)
    acc = q.new_zeros((n, heads, dim), dtype=torch.float32)
    for j in range(page_table.shape[1]):
        # [N, C]
        rows = (page_table[seq_index, j].long()[:, None] + offsets).clamp(0, k_rows.shape[0] - 1)
        valid = (j * page + offsets)[None, :] <= positions[:, None]  # [N, C]
        # [N, H, C, D]
        kh = k_rows[rows].float().permute(0, 2, 1, 3).repeat_interleave(groups, dim=1)
        vh = torch.where(valid[:, :, None, None], v_rows[rows].float(), 0.0)
        vh = vh.permute(0, 2, 1, 3).repeat_interleave(groups, dim=1)
        # [N, H, C]
        scores = (ops.tree_sum(qf * kh, -1) * scale).masked_fill(~valid[:, None, :], float("-inf"))
        m_new = torch.maximum(m, ops.tree_max(scores, -1))
        p = ops.exp(scores - m_new[..., None])
        alpha = ops.exp(m - m_new)
        active = valid[:, :1]  # [N, 1]: the page holds a key of this query
        norm = torch.where(active, norm * alpha + ops.tree_sum(p, -1), norm)
        acc = torch.where(active[..., None],
                          acc * alpha[..., None] + ops.tree_sum(p[..., None] * vh, -2), acc)
        m = torch.where(active, m_new, m)
    return (acc / norm[..., None]).to(q.dtype)
