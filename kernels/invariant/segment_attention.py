"""Attention of the batch-invariant mode on GPUs: ONE Triton kernel for decode, prefill and the
packed training forward, reading keys through a page table.

Every query is one program per KV head (its GQA group of query heads as the rows of one tile), and
its keys are cut by position into fixed segments of `segment` keys (0..segment-1,
segment..2*segment-1, ...). A segment is reduced in steps of KEYS keys with an online softmax; the
segments' partial results (max, sum, unnormalized output) are then merged in segment order by a
second kernel. Nothing in that sequence of instructions depends on the batch: a query's tile holds
its own heads at the same rows, its keys at the same columns, in the same steps, in the paged cache
(decode, prefill) as in a training pack, because both are read through the same indirection, a page
table of key rows:

    key at position p of the query's sequence = row  page_table[seq, p // page] + p % page

For the paged cache that table is `block_tables * page` over the cache flattened to rows; for a
training pack it is `start + j * page` over the packed K/V. Segments (not one program walking the
whole context) keep a batch of 1 on many SMs; which program computes which segment may vary with the
batch (`segment_programs`), the segment's arithmetic cannot. Padding heads (GROUP_PAD > GROUP)
compute on zeros and are never stored.
"""
from __future__ import annotations

import torch

from ..triton_compat import tl, triton
from ..direct_ops import direct_op

# Partial results held at once, in fp32 elements (256 MiB): longer batches run in query pieces.
PARTIAL_ELEMENTS = 1 << 26


@triton.jit(do_not_specialize=["table_stride", "max_segments", "segment_programs"])
def _segment_attention_kernel(
    q_ptr,  # [N, H, D] queries (RoPE applied), contiguous
    k_ptr,  # [rows, Hkv, D] keys, contiguous: the paged cache as rows, or a pack's keys
    v_ptr,  # same layout as k
    positions_ptr,  # [N] int64: query n sees keys 0..positions[n] of its sequence
    seq_ptr,  # [N] int64: the row of page_table of query n's sequence
    page_table_ptr,  # [S, W] int32: first key row of each page of each sequence
    part_acc_ptr,  # [N, H, max_segments, DIM_PAD] fp32 out: each segment's sum of p * v
    part_max_ptr,  # [N, H, max_segments] fp32 out: its largest score
    part_sum_ptr,  # [N, H, max_segments] fp32 out: its sum of p = exp(score - max)
    scale,  # head_dim ** -0.5
    table_stride,  # W
    max_segments,
    segment_programs,  # programs sharing one query's segments (grid axis 2)
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # >= 16 (a tl.dot operand) and a power of two
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    SEGMENT: tl.constexpr,
    KEYS: tl.constexpr,  # keys per step, divides SEGMENT
    IEEE: tl.constexpr,  # fp32 operands: exact FMA products, no TF32
    INTERPRETED: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    position = tl.load(positions_ptr + n)
    seq = tl.load(seq_ptr + n).to(tl.int64)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + (n * (NUM_KV_HEADS * GROUP) + heads[:, None]) * HEAD_DIM + d[None, :],
                mask=(g[:, None] < GROUP) & (d[None, :] < HEAD_DIM), other=0.0)  # [G, D]
    part = (n * (NUM_KV_HEADS * GROUP) + heads) * max_segments  # [G]: index of segment 0
    for s in range(tl.program_id(2), position // SEGMENT + 1, segment_programs):
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
        # Every step holds at least its first key (<= position): the max below is finite.
        for first in range(s * SEGMENT, tl.minimum(s * SEGMENT + SEGMENT, position + 1), KEYS):
            keys = first + tl.arange(0, KEYS)
            valid = keys <= position
            rows = tl.load(page_table_ptr + seq * table_stride + keys // PAGE, mask=valid,
                           other=0).to(tl.int64)
            rows += keys % PAGE
            kv_mask = valid[:, None] & (d[None, :] < HEAD_DIM)
            kv_off = (rows[:, None] * NUM_KV_HEADS + kv_head) * HEAD_DIM + d[None, :]  # [KEYS, D]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
            # q @ k.T on tensor cores for 16-bit operands (exact products, fp32 sums), by FMA in
            # IEEE fp32 for fp32 ones. The interpreter's tl.dot is numpy's matmul, whose BLAS
            # micro-kernels round by a row's position in the tile and mishandle 16-bit floats: an
            # explicit sum of products stands in. (Inline, not a jit helper: the interpreter
            # re-patches per call.)
            if INTERPRETED:
                scores = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
            elif IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = scores * scale  # [G, KEYS]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            if INTERPRETED:  # p @ v, in IEEE fp32 (p is not rounded to 16 bits)
                pv = tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            else:
                pv = tl.dot(p, v, input_precision="ieee")
            acc = acc * alpha[:, None] + pv
            m = m_new
        stored = g < GROUP
        tl.store(part_max_ptr + part + s, m, mask=stored)
        tl.store(part_sum_ptr + part + s, l, mask=stored)
        tl.store(part_acc_ptr + (part + s)[:, None] * DIM_PAD + d[None, :], acc,
                 mask=stored[:, None])


@triton.jit(do_not_specialize=["max_segments"])
def _merge_segments_kernel(
    part_acc_ptr,  # [N, H, max_segments, DIM_PAD] fp32
    part_max_ptr,  # [N, H, max_segments] fp32
    part_sum_ptr,  # [N, H, max_segments] fp32
    positions_ptr,  # [N] int64
    out_ptr,  # [N, H, D] contiguous, the queries' dtype
    max_segments,
    NUM_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    SEGMENT: tl.constexpr,
):
    # One program per query: each head's segments merged one after another, in segment order.
    n = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, DIM_PAD)
    live = h < NUM_HEADS
    part = (n * NUM_HEADS + h) * max_segments  # [H]
    m = tl.load(part_max_ptr + part, mask=live, other=0.0)
    l = tl.load(part_sum_ptr + part, mask=live, other=1.0)
    acc = tl.load(part_acc_ptr + part[:, None] * DIM_PAD + d[None, :], mask=live[:, None],
                  other=0.0)
    for s in range(1, tl.load(positions_ptr + n) // SEGMENT + 1):
        m_s = tl.load(part_max_ptr + part + s, mask=live, other=0.0)
        m_new = tl.maximum(m, m_s)
        a = tl.exp(m - m_new)
        b = tl.exp(m_s - m_new)
        l = l * a + tl.load(part_sum_ptr + part + s, mask=live, other=0.0) * b
        acc = acc * a[:, None] + tl.load(part_acc_ptr + (part + s)[:, None] * DIM_PAD + d[None, :],
                                         mask=live[:, None], other=0.0) * b[:, None]
        m = m_new
    tl.store(out_ptr + (n * NUM_HEADS + h[:, None]) * HEAD_DIM + d[None, :],
             (acc / l[:, None]).to(out_ptr.dtype.element_ty),
             mask=live[:, None] & (d[None, :] < HEAD_DIM))


def keys_per_step(head_dim: int, segment: int) -> int:
    """Keys reduced per loop step: 64 (32 for head dims over 64, to bound registers), at most the
    segment."""
    return min(64 if triton.next_power_of_2(head_dim) <= 64 else 32, segment)


def segment_attention(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                      positions: torch.Tensor, seq_index: torch.Tensor, page_table: torch.Tensor,
                      page: int, segment: int, max_position: int,
                      segment_programs: int | None = None) -> torch.Tensor:
    """Causal attention of each query over its sequence's keys 0..position, read through a page
    table.

    q [N, H, D]; k_rows, v_rows [rows, Hkv, D] (all three contiguous); positions, seq_index [N]
    int64; page_table [S, W] int32 (key row of each page's first key; entries a query never reaches
    may be anything); page: keys per page; segment: keys per segment (a power of two >= 16);
    max_position: an int >= every position (sizes the partial results; a host value, so no device
    sync).
    segment_programs: programs per (query, KV head), default enough to fill the GPU. Returns [N, H,
    D] in q's dtype, each query's row a fixed function of its own keys (see the module docstring).
    """
    n, heads, head_dim = q.shape
    if (k_rows.shape != v_rows.shape or k_rows.dim() != 3 or k_rows.shape[2] != head_dim
        or heads % k_rows.shape[1]):
        raise ValueError(
            f"segment_attention: k_rows {tuple(k_rows.shape)} / v_rows {tuple(v_rows.shape)} "
            f"do not fit q {tuple(q.shape)}")
    if not (q.is_contiguous() and k_rows.is_contiguous() and v_rows.is_contiguous()):
        raise ValueError("segment_attention: q, k_rows and v_rows must be contiguous")
    if positions.shape != (n,) or seq_index.shape != (n,) or positions.dtype != torch.int64 \
            or seq_index.dtype != torch.int64:
        raise ValueError(f"segment_attention: positions and seq_index must be int64 [{n}], got "
                         f"{positions.dtype} {tuple(positions.shape)} and {seq_index.dtype} "
                         f"{tuple(seq_index.shape)}")
    if page_table.dtype != torch.int32 or page_table.dim() != 2 or page_table.stride(1) != 1:
        raise ValueError(
            f"segment_attention: page_table must be int32 [S, W] with unit column stride, got "
            f"{page_table.dtype} {tuple(page_table.shape)}")
    if segment < 16 or segment & (segment - 1):
        raise ValueError(f"segment_attention: segment={segment} must be a power of two >= 16")
    if segment_programs is None:
        segment_programs = _default_segment_programs(n * k_rows.shape[1],
                                                     max_position // segment + 1, q.device)
    return _segment_attention_op(q, k_rows, v_rows, positions, seq_index, page_table, page,
                                 segment, max_position, segment_programs)


@direct_op("fusedrl::segment_attention", mutates_args=())
def _segment_attention_op(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                          positions: torch.Tensor, seq_index: torch.Tensor,
                          page_table: torch.Tensor, page: int, segment: int, max_position: int,
                          segment_programs: int) -> torch.Tensor:
    n, heads, head_dim = q.shape
    kv_heads = k_rows.shape[1]
    group = heads // kv_heads
    dim_pad = max(16, triton.next_power_of_2(head_dim))
    max_segments = max_position // segment + 1
    out = torch.empty_like(q)
    # Pieces of whole 16-query blocks keep every piece's pointers as aligned as the whole's.
    piece = max(16, PARTIAL_ELEMENTS // (heads * max_segments * dim_pad) // 16 * 16)
    part_acc = q.new_empty(min(n, piece), heads, max_segments, dim_pad, dtype=torch.float32)
    part_max = q.new_empty(min(n, piece), heads, max_segments, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    for begin in range(0, n, piece):
        rows = min(piece, n - begin)
        q_piece, pos_piece = q[begin:begin + rows], positions[begin:begin + rows]
        _segment_attention_kernel[(rows, kv_heads, segment_programs)](
            q_piece, k_rows, v_rows, pos_piece, seq_index[begin:begin + rows], page_table,
            part_acc, part_max, part_sum, head_dim ** -0.5, page_table.stride(0), max_segments,
            segment_programs, NUM_KV_HEADS=kv_heads, GROUP=group,
            GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, DIM_PAD=dim_pad,
            PAGE=page, SEGMENT=segment, KEYS=keys_per_step(head_dim, segment),
            IEEE=q.dtype == torch.float32, INTERPRETED=not q.is_cuda)
        _merge_segments_kernel[(rows,)](
            part_acc, part_max, part_sum, pos_piece, out[begin:begin + rows], max_segments,
            NUM_HEADS=heads, HEADS_PAD=triton.next_power_of_2(heads), HEAD_DIM=head_dim,
            DIM_PAD=dim_pad, SEGMENT=segment)
    return out


@_segment_attention_op.register_fake
def _segment_attention_fake(q, k_rows, v_rows, positions, seq_index, page_table, page, segment,
                            max_position, segment_programs):
    return torch.empty_like(q)


def _default_segment_programs(programs: int, max_segments: int, device) -> int:
    """Programs per (query, KV head) so that the grid covers every SM twice (1 off CUDA). Depends
    on shapes only: CUDA-graph safe; which program takes which segment does not change its
    result."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(max_segments, -(-2 * sms // max(programs, 1))))
