"""Triton kernels for the paged KV cache, each next to its plain-PyTorch reference.

Cache layout (one layer, one of K or V): `[num_blocks, block_size, num_kv_heads, head_dim]`, contiguous,
the layout flash-attn's `flash_attn_with_kvcache` takes, so one pool serves every backend. A slot is
`block_id * block_size + offset`; slot -1 marks a padding row (CUDA-graph batches) and is skipped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,  # [N, Hkv, D] new keys, rows `k_row_stride` apart, heads and dims contiguous
    v_ptr,  # [N, Hkv, D] new values
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D] contiguous
    v_cache_ptr,  # same shape as k_cache
    slot_ptr,  # [N] int64 slot of each row, -1 to skip
    k_row_stride,  # elements between rows of k
    v_row_stride,  # elements between rows of v
    ROW: tl.constexpr,  # Hkv * D, elements of one row
    BLOCK: tl.constexpr,  # ROW rounded up to a power of two
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)  # int64: slot * ROW overflows int32 on large pools
    offs = tl.arange(0, BLOCK)
    mask = offs < tl.where(slot >= 0, ROW, 0)  # a padding row writes nothing
    k = tl.load(k_ptr + token * k_row_stride + offs, mask=mask)
    v = tl.load(v_ptr + token * v_row_stride + offs, mask=mask)
    tl.store(k_cache_ptr + slot * ROW + offs, k, mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, v, mask=mask)


def store_kv_triton(k, v, k_cache, v_cache, slot_mapping):
    """Write rows of `k`, `v` [N, Hkv, D] into the caches at `slot_mapping` [N] (int64, -1 = skip)."""
    _check_store(k, v, k_cache, v_cache, slot_mapping)
    n, num_kv_heads, head_dim = k.shape
    row = num_kv_heads * head_dim
    _store_kv_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
        ROW=row, BLOCK=triton.next_power_of_2(row))


def store_kv_torch(k, v, k_cache, v_cache, slot_mapping):
    """Reference for `store_kv_triton`: the same writes through advanced indexing."""
    _check_store(k, v, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k.shape[1:])[slots] = k[keep]
    v_cache.view(-1, *v.shape[1:])[slots] = v[keep]


def _check_store(k, v, k_cache, v_cache, slot_mapping):
    if k.shape != v.shape or k.shape[1:] != k_cache.shape[2:] or k_cache.shape != v_cache.shape:
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} do not fit caches {tuple(k_cache.shape)}")
    if k.stride()[1:] != (k.shape[2], 1) or v.stride()[1:] != (v.shape[2], 1):
        raise ValueError("k and v must have contiguous heads and head dims")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64 [{k.shape[0]}], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [B, H, D] one query token per sequence
    k_cache_ptr,  # [num_blocks, PAGE, NUM_KV_HEADS, HEAD_DIM] contiguous
    v_cache_ptr,  # same shape as k_cache
    block_tables_ptr,  # [B, max_blocks] int32 block ids of each sequence
    context_lens_ptr,  # [B] int32 tokens in the cache for each sequence (0 = padding row)
    out_ptr,  # [B, H, D]
    scale,  # softmax scale, head_dim ** -0.5
    q_stride_b, q_stride_h, bt_stride_b, o_stride_b, o_stride_h,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head (GQA)
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    PAGE: tl.constexpr,  # block size of the cache
    PAGE_PAD: tl.constexpr,  # PAGE rounded up to a power of two (tl.arange needs one)
):
    # One program per (sequence, KV head): the GROUP query heads that share a KV head read its
    # pages once. Online softmax over pages, fp32 accumulators.
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    ctx = tl.load(context_lens_ptr + b)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    p = tl.arange(0, PAGE_PAD)
    heads = kv_head * GROUP + g
    q_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * q_stride_b + heads[:, None] * q_stride_h + d[None, :], mask=q_mask, other=0.0)
    q = q.to(tl.float32) * scale  # [G, D]
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for start in range(0, ctx, PAGE):
        block = tl.load(block_tables_ptr + b * bt_stride_b + start // PAGE).to(tl.int64)
        pos = start + p
        valid = (p < PAGE) & (pos < ctx)
        kv_mask = valid[:, None] & (d[None, :] < HEAD_DIM)
        kv_off = ((block * PAGE + p[:, None]) * NUM_KV_HEADS + kv_head) * HEAD_DIM + d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)  # [P, D]
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, P]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        probs = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(probs, axis=1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)  # [P, D]
        acc = acc * alpha[:, None] + tl.sum(probs[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # l == 0 only on padding rows, which are discarded
    tl.store(out_ptr + b * o_stride_b + heads[:, None] * o_stride_h + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Attention of one query token per sequence over its paged context.

    q [B, H, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32;
    context_lens [B] int32. Returns [B, H, D] in q's dtype.
    """
    batch, num_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    _check_decode(q, k_cache, v_cache, block_tables, context_lens)
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    _paged_decode_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim), PAGE=page,
        PAGE_PAD=triton.next_power_of_2(page))
    return out


def paged_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Reference for `paged_decode_triton` (and the CPU path): gather pages, mask, SDPA."""
    _check_decode(q, k_cache, v_cache, block_tables, context_lens)
    k = k_cache[block_tables.long()].flatten(1, 2).transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache[block_tables.long()].flatten(1, 2).transpose(1, 2)
    mask = torch.arange(k.shape[2], device=q.device) < context_lens[:, None]  # [B, L]
    # Slots past a sequence's length (and padding entries, -1, which gather the last block) hold
    # whatever the pool held: possibly NaN, and a masked-out NaN still poisons softmax(...) @ v.
    unwritten = ~mask[:, None, :, None]
    k, v = k.masked_fill(unwritten, 0), v.masked_fill(unwritten, 0)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
    return out.squeeze(2)  # [B, H, D]


def _check_decode(q, k_cache, v_cache, block_tables, context_lens):
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if q.stride(2) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q's head dim and the caches must be contiguous")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if block_tables.shape[0] != q.shape[0] or context_lens.shape != (q.shape[0],):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} / context_lens "
                         f"{tuple(context_lens.shape)} do not match batch {q.shape[0]}")
