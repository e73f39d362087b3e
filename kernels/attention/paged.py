"""The paged KV cache's ops: Triton kernels, their host functions (`*_triton`), custom ops and the
public `store_kv` / `paged_decode` / `rope_store_decode`, which run the kernels where the model's
kernels run (dispatch.fused_for_model) and the plain-PyTorch references (kernels.reference.store_kv,
paged_decode, rope_store_decode) elsewhere.

Cache layout (one layer, one of K or V): `[num_blocks, block_size, num_kv_heads, head_dim]`,
contiguous, the layout flash-attn's `flash_attn_with_kvcache` takes, so one pool serves every
backend. A slot is `block_id * block_size + offset`; slot -1 marks a padding row (CUDA-graph
batches) and is skipped. The Triton paths are torch custom ops (fusedrl::store_kv,
fusedrl::paged_decode): one node to torch.compile and one op to a TorchDispatchMode such as
bench/traffic_count.py.
"""
from __future__ import annotations

import torch

from .. import checks, reference
from ..dispatch import fused_for_model, sync_checks_enabled
from ..triton_compat import tl, triton
from ..model.norm import rows_per_program
from ..tile_dot import dot_nt
from ..direct_ops import direct_op


@triton.jit
def _store_kv_kernel(
    k_ptr,  # [N, Hkv, D] new keys, rows `k_row_stride` apart, heads and dims contiguous
    v_ptr,  # [N, Hkv, D] new values
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D] contiguous
    v_cache_ptr,  # same shape as k_cache
    slot_ptr,  # [N] int64 slot of each row, -1 to skip
    n_tokens,  # N
    k_row_stride,  # elements between rows of k
    v_row_stride,  # elements between rows of v
    ROW: tl.constexpr,  # Hkv * D, elements of one row
    BLOCK: tl.constexpr,  # ROW rounded up to a power of two
    TOKENS: tl.constexpr,  # rows per program
):
    token = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    in_range = token < n_tokens
    # int64: slot * ROW overflows int32 on large pools
    slot = tl.load(slot_ptr + token, mask=in_range, other=-1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    # A padding row writes nothing; the condition is uniform along a row, so accesses stay wide.
    mask = (slot >= 0)[:, None] & (offs < ROW)[None, :]
    k = tl.load(k_ptr + (token * k_row_stride)[:, None] + offs[None, :], mask=mask)
    v = tl.load(v_ptr + (token * v_row_stride)[:, None] + offs[None, :], mask=mask)
    tl.store(k_cache_ptr + (slot * ROW)[:, None] + offs[None, :], k, mask=mask)
    tl.store(v_cache_ptr + (slot * ROW)[:, None] + offs[None, :], v, mask=mask)


def check_kv_write(op, k, v, k_cache, v_cache, slot_mapping):
    """A KV store's arguments (checks.check_kv_store) and, where sync checks run, its slots: one
    past the pool would be written out of bounds."""
    checks.check_kv_store(k, v, k_cache, v_cache, slot_mapping, op=op)
    if sync_checks_enabled(slot_mapping):
        checks.check_slot_range(op, slot_mapping, k_cache)


def store_kv_triton(k, v, k_cache, v_cache, slot_mapping):
    """Write rows of `k`, `v` [N, Hkv, D] into the caches at `slot_mapping` [N] (int64, -1 =
    skip)."""
    check_kv_write("store_kv", k, v, k_cache, v_cache, slot_mapping)
    _store_kv_op(k, v, k_cache, v_cache, slot_mapping)


@direct_op("fusedrl::store_kv", mutates_args=("k_cache", "v_cache"))
def _store_kv_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    n, num_kv_heads, head_dim = k.shape
    row = num_kv_heads * head_dim
    block = triton.next_power_of_2(row)
    # A row of 128 (Qwen2.5-0.5B's 2 KV heads x 64) alone would leave each thread one element.
    tokens = rows_per_program(block)
    _store_kv_kernel[(triton.cdiv(n, tokens),)](
        k, v, k_cache, v_cache, slot_mapping, n, k.stride(0), v.stride(0),
        ROW=row, BLOCK=block, TOKENS=tokens)


@_store_kv_op.register_fake
def _store_kv_fake(k, v, k_cache, v_cache, slot_mapping):
    return None


@triton.jit
def _rotated(x_ptr, row_off, d, mask, cos_ptr, sin_ptr, pos, HEAD_DIM: tl.constexpr):
    """RoPE (rotate-half) of rows at x_ptr + row_off[:, None] + d[None, :] for position `pos`, in
    fp32 and rounded once to x's dtype, as model/rotary.py: x * cos + rotate_half(x) * sin."""
    half = HEAD_DIM // 2
    partner = tl.where(d < half, d + half, d - half)
    sign = tl.where(d < half, -1.0, 1.0)
    x = tl.load(x_ptr + row_off[:, None] + d[None, :], mask=mask, other=0.0)
    x_partner = tl.load(x_ptr + row_off[:, None] + partner[None, :], mask=mask,
                        other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + pos * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
    return (x.to(tl.float32) * cos[None, :] + sign[None, :] * x_partner * sin[None, :]).to(x.dtype)


@triton.jit
# rotate q and k, store k and v, attend to the new token from registers
def _paged_decode_kernel(
    q_ptr,  # [B, H, D] one query token per sequence (NEW_TOKEN: before RoPE)
    k_cache_ptr,  # [num_blocks, PAGE, NUM_KV_HEADS, HEAD_DIM] contiguous
    v_cache_ptr,  # same shape as k_cache
    block_tables_ptr,  # [B, max_blocks] int32 block ids of each sequence
    context_lens_ptr,  # [B] int32 tokens in the cache for each sequence (0 = padding row)
    part_out_ptr,  # [B, H, NUM_SPLITS, DIM_PAD] fp32 out: each split's normalized attention output
    part_lse_ptr,  # [B, H, NUM_SPLITS] fp32 out: each split's log-sum-exp (-inf if it saw nothing)
    scale,  # softmax scale, head_dim ** -0.5
    q_stride_b, q_stride_h, bt_stride_b,
    # NEW_TOKEN only: the step's own token, not yet in the cache (its context_len counts it)
    k_new_ptr, v_new_ptr,  # [B, NUM_KV_HEADS, HEAD_DIM] its key (before RoPE) and value
    k_new_stride_b, v_new_stride_b,  # elements between rows (heads and dims contiguous)
    cos_ptr, sin_ptr,  # [max positions, HEAD_DIM] RoPE tables
    pos_ptr,  # [B] int64 position of each row's token
    slot_ptr,  # [B] int64 cache slot of each row's token, -1 = padding
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head (GQA)
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,  # HEAD_DIM rounded up to a power of two, at least 16 (a dot's K)
    PAGE: tl.constexpr,  # block size of the cache
    PAGE_PAD: tl.constexpr,  # PAGE rounded up to a power of two: a tile holds at least one page
    NUM_SPLITS: tl.constexpr,  # programs sharing one sequence's pages (flash-decoding)
    NEW_TOKEN: tl.constexpr,
    INTERPRETED: tl.constexpr,  # the interpreter's stand-in for the dots (tile_dot.dot_nt)
):
    # One program per (sequence, KV head, split): the GROUP query heads sharing a KV head read its
    # pages once; the pages are cut into NUM_SPLITS runs so that a small batch still fills the GPU.
    # A run is read TILE positions at a time (several pages: one block-table gather, then K and V
    # tiles the dots consume, which Triton's pipeliner prefetches a tile ahead); a page at a time,
    # each a block id then K then V, the walk was latency-bound (130 us a layer at batch 256 on an
    # H100, 17x its bytes). Online softmax over tiles, fp32 accumulators; the dots take the heads
    # padded to 16 rows, their smallest M.
    HEADS: tl.constexpr = GROUP_PAD if GROUP_PAD > 16 else 16
    TILE: tl.constexpr = PAGE_PAD if PAGE_PAD > 64 else 64  # at least a page, MIN_SPLIT_TOKENS
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    num_pages = tl.cdiv(ctx, PAGE)
    # 1 on a padding row: no division by 0
    pages_per_split = tl.maximum(tl.cdiv(num_pages, NUM_SPLITS), 1)
    cached = ctx - 1 if NEW_TOKEN else ctx  # positions read from the pages
    # this split's positions: its pages' (with NEW_TOKEN the last page may hold the new one only)
    first = split * pages_per_split * PAGE
    stop = tl.minimum((split + 1) * pages_per_split * PAGE, cached)
    g = tl.arange(0, HEADS)
    d = tl.arange(0, DIM_PAD)
    t = tl.arange(0, TILE)
    heads = kv_head * GROUP + g
    q_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q_rows = b * q_stride_b + heads * q_stride_h
    if NEW_TOKEN:
        pos = tl.maximum(tl.load(pos_ptr + b), 0)  # a padding row's -1 reads position 0, unused
        q = _rotated(q_ptr, q_rows, d, q_mask, cos_ptr, sin_ptr, pos, HEAD_DIM)
    else:
        q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=q_mask, other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)  # [G, D], the dot's operand (scaled after it)
    m = tl.full([HEADS], float("-inf"), tl.float32)
    l = tl.zeros([HEADS], tl.float32)
    acc = tl.zeros([HEADS, DIM_PAD], tl.float32)
    for start in range(first, stop, TILE):
        pos_k = start + t
        valid = pos_k < stop
        block = tl.load(block_tables_ptr + b * bt_stride_b + pos_k // PAGE, mask=valid,
                        other=0).to(tl.int64)
        slot_k = block * PAGE + pos_k % PAGE
        kv_mask = valid[:, None] & (d[None, :] < HEAD_DIM)
        kv_off = (slot_k[:, None] * NUM_KV_HEADS + kv_head) * HEAD_DIM + d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [T, D]
        s = dot_nt(q, k, tl.zeros([HEADS, TILE], tl.float32), INTERPRETED) * scale  # [G, T]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        probs = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(probs, axis=1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [T, D]
        acc = dot_nt(probs.to(v.dtype), tl.trans(v), acc * alpha[:, None], INTERPRETED)
        m = m_new
    if NEW_TOKEN:
        # The split holding the last page stores the new K (rotated) and V and attends to them from
        # registers: no other program reads that slot in this launch, so no ordering is needed.
        slot = tl.load(slot_ptr + b)
        if (ctx > 0) & (slot >= 0) & (split == (num_pages - 1) // pages_per_split):
            one = tl.arange(0, 1)
            d_ok = d[None, :] < HEAD_DIM
            k_new = _rotated(k_new_ptr, b * k_new_stride_b + kv_head * HEAD_DIM + one, d, d_ok,
                             cos_ptr, sin_ptr, pos, HEAD_DIM)  # [1, D]
            v_new = tl.load(
                v_new_ptr + b * v_new_stride_b + kv_head * HEAD_DIM + one[:, None] + d[None, :],
                mask=d_ok, other=0.0)
            cache_off = (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM + one[:, None] + d[None, :]
            tl.store(k_cache_ptr + cache_off, k_new, mask=d_ok)
            tl.store(v_cache_ptr + cache_off, v_new, mask=d_ok)
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1) * scale  # [G]
            m_new = tl.maximum(m, s_new)
            alpha = tl.exp(m - m_new)
            p_new = tl.exp(s_new - m_new)
            l = l * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)
            m = m_new
    # A split that saw no page (short context, padding row) reports lse -inf and weighs nothing.
    seen = l > 0
    out = acc / tl.where(seen, l, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log(tl.where(seen, l, 1.0)), float("-inf"))
    # [G] index into [B, H, NUM_SPLITS]
    part = (b * GROUP * NUM_KV_HEADS + heads) * NUM_SPLITS + split
    tl.store(part_out_ptr + part[:, None] * DIM_PAD + d[None, :], out, mask=g[:, None] < GROUP)
    tl.store(part_lse_ptr + part, lse, mask=g < GROUP)


@triton.jit
def _combine_splits_kernel(
    part_out_ptr,  # [B, H, NUM_SPLITS, DIM_PAD] fp32
    part_lse_ptr,  # [B, H, NUM_SPLITS] fp32
    out_ptr,  # [B, H, D]
    o_stride_b, o_stride_h,
    NUM_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # NUM_SPLITS rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    # One program per (sequence, head): weight each split's output by its share of the softmax mass.
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, DIM_PAD)
    row = (b * NUM_HEADS + h) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + row + sp, mask=sp < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # padding row: every weight is 0, output 0
    w = tl.exp(lse - m)  # [S]
    parts = tl.load(part_out_ptr + (row + sp[:, None]) * DIM_PAD + d[None, :],
                    mask=sp[:, None] < NUM_SPLITS, other=0.0)  # [S, D]
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * o_stride_b + h * o_stride_h + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None):
    """Attention of one query token per sequence over its paged context.

    q [B, H, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32;
    context_lens [B] int32. Returns [B, H, D] in q's dtype. num_splits: programs per (sequence,
    KV head); by default decode_splits' (1 off CUDA).
    """
    checks.check_paged_decode(q, k_cache, v_cache, block_tables, context_lens)
    if num_splits is None:
        num_splits = _default_splits(q, k_cache, block_tables)
    return _paged_decode_op(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)


@direct_op("fusedrl::paged_decode", mutates_args=())
def _paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     num_splits: int) -> torch.Tensor:
    return _launch_decode(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)


@_paged_decode_op.register_fake
def _paged_decode_fake(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits):
    return q.new_empty(q.shape)


def rope_store_decode(q, k, v, cos_table, sin_table, positions, k_cache, v_cache, slot_mapping,
                      block_tables, context_lens, scale, num_splits=None):
    """A decode step's attention with its RoPE and KV store (arguments and result as
    `rope_store_decode_triton`): one launch on the "triton" model backend, the reference on
    "torch" (one pass: num_splits is the Triton launch's)."""
    if fused_for_model(q):  # which checks its arguments
        return rope_store_decode_triton(q, k, v, cos_table, sin_table, positions, k_cache, v_cache,
                                        slot_mapping, block_tables, context_lens, scale, num_splits)
    check_kv_write("rope_store_decode", k, v, k_cache, v_cache, slot_mapping)
    return reference.rope_store_decode(q, k, v, cos_table, sin_table, positions, k_cache, v_cache,
                                       slot_mapping, block_tables, context_lens, scale)


def rope_store_decode_triton(q, k, v, cos_table, sin_table, positions, k_cache, v_cache,
                             slot_mapping, block_tables, context_lens, scale, num_splits=None):
    """A decode step's attention with its RoPE and KV store in the same launch: q [B, H, D], k, v
    [B, Hkv, D] before RoPE (views of the q/k/v GEMM's rows are fine), cos/sin tables [L, D],
    positions and slot_mapping [B] int64 (slot -1: a padding row), context_lens [B] int32 counting
    the new token -> [B, H, D] in q's dtype; k (rotated) and v written into the caches. The same
    numbers as `rope` then `store_kv_triton` then `paged_decode_triton`."""
    checks.check_paged_decode(q, k_cache, v_cache, block_tables, context_lens)
    check_kv_write("rope_store_decode", k, v, k_cache, v_cache, slot_mapping)
    if positions.shape != (q.shape[0],) or positions.dtype != torch.int64:
        raise ValueError(
            f"positions must be int64 [{q.shape[0]}], got {positions.dtype} "
            f"{tuple(positions.shape)}")
    if cos_table.shape != sin_table.shape or cos_table.shape[1:] != (q.shape[2],) or not (
            cos_table.is_contiguous() and sin_table.is_contiguous()):
        raise ValueError(
            f"cos/sin tables must be contiguous [L, {q.shape[2]}], got {tuple(cos_table.shape)} "
            f"and {tuple(sin_table.shape)}")
    if num_splits is None:
        num_splits = _default_splits(q, k_cache, block_tables)
    return _rope_store_decode_op(q, k, v, cos_table, sin_table, positions, k_cache, v_cache,
                                 slot_mapping, block_tables, context_lens, scale, num_splits)


@direct_op("fusedrl::rope_store_decode", mutates_args=("k_cache", "v_cache"))
def _rope_store_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                          num_splits: int) -> torch.Tensor:
    return _launch_decode(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits,
                          new=(k, v, cos_table, sin_table, positions, slot_mapping))


@_rope_store_decode_op.register_fake
def _rope_store_decode_fake(q, k, v, cos_table, sin_table, positions, k_cache, v_cache,
                            slot_mapping, block_tables, context_lens, scale, num_splits):
    return q.new_empty(q.shape)


def _launch_decode(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, new=None):
    """The split decode kernel then the combine: [B, H, D] (contiguous, q's dtype). new: (k, v, cos
    table, sin table, positions, slots) of the step's own token (rotated, stored, attended to)."""
    batch, num_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    dim_pad = max(16, triton.next_power_of_2(head_dim))  # the dots' smallest K
    part_out = torch.empty(batch, num_heads, num_splits, dim_pad, dtype=torch.float32,
                           device=q.device)
    part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    k_new, v_new, cos, sin, positions, slots = new if new is not None else (q, q, q, q,
                                                                            context_lens,
                                                                            context_lens)
    _paged_decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part_out, part_lse, scale,
        q.stride(0), q.stride(1), block_tables.stride(0),
        k_new, v_new, k_new.stride(0), v_new.stride(0), cos, sin, positions, slots,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        HEAD_DIM=head_dim, DIM_PAD=dim_pad, PAGE=page, PAGE_PAD=triton.next_power_of_2(page),
        NUM_SPLITS=num_splits, NEW_TOKEN=new is not None, INTERPRETED=not q.is_cuda)
    out = q.new_empty(q.shape)
    _combine_splits_kernel[(batch, num_heads)](
        part_out, part_lse, out, out.stride(0), out.stride(1), NUM_HEADS=num_heads,
        NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
        DIM_PAD=dim_pad)
    return out


# Splits per (sequence, KV head): a power of two (few distinct compilations: NUM_SPLITS is a
# constexpr) up to 64, so batch 1 of a 4-KV-head model (Qwen2.5-7B) runs 256 programs, two per SM of
# an H100's 132, from 4k tokens of context on; each split reads at least MIN_SPLIT_TOKENS (4 pages
# of 16), below which its fixed cost (a program, a partial row to combine) outweighs its pages.
MAX_SPLITS = 64
MIN_SPLIT_TOKENS = 64


def decode_splits(programs: int, context_pages: int, page: int, sms: int) -> int:
    """Splits per (sequence, KV head) for `programs` (sequence, KV head) pairs whose contexts span
    up to `context_pages` pages of `page` tokens, on `sms` SMs: enough for two programs per SM, no
    more than the context holds MIN_SPLIT_TOKENS runs, rounded down to a power of two, at most
    MAX_SPLITS."""
    wanted = -(-2 * sms // max(programs, 1))
    useful = max(1, context_pages * page // MIN_SPLIT_TOKENS)
    splits = max(1, min(MAX_SPLITS, wanted, useful))
    return 1 << (splits.bit_length() - 1)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; 0 off CUDA (one split: nothing to fill)."""
    if torch.device(device).type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_splits(batch: int, kv_heads: int, table_width: int, page: int, device) -> int:
    """The one rule for a decode launch's splits: decode_splits for batch x KV heads programs whose
    contexts span up to `table_width` pages of `page` tokens on `device` (1 off CUDA). A caller
    whose tables vary in width step to step (the runner's eager steps) passes their capacity, so
    its steps split as its CUDA graphs (full-width tables) do and give the same bits."""
    sms = sm_count(device)
    return decode_splits(batch * kv_heads, table_width, page, sms) if sms else 1


def _default_splits(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor) -> int:
    """launch_splits from this launch's shapes alone (CUDA-graph safe), the block tables' width as
    the context bound."""
    return launch_splits(q.shape[0], k_cache.shape[2], block_tables.shape[1], k_cache.shape[1],
                         q.device)


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write k, v [N, Hkv, D] into the caches [blocks, page, Hkv, D] at slot_mapping [N] int64 (slot
    -1: a padding row, skipped)."""
    if fused_for_model(k):  # which checks its arguments
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        check_kv_write("store_kv", k, v, k_cache, v_cache, slot_mapping)
        reference.store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Attention of one query token per sequence, q [B, H, D], over its paged context (block_tables
    [B, max_blocks], context_lens [B] int32) -> [B, H, D] in q's dtype."""
    if fused_for_model(q):
        return paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale)
    return reference.paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
