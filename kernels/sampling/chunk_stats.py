"""The split-row sampler's first two launches (host side and the whole algorithm: sampler.py):

1. `_chunk_stats_kernel` [rows, chunks] reads the logits once: each chunk's max, sum of exp, first
   argmax, best Gumbel score (rows that draw without a cut) and, for rows with top-k or top-p, its
   tokens per profile cell below the chunk's top cell;
2. `_merge_kernel` [rows] merges the chunks (the plain and greedy rows are then done) and, for rows
   with a cut, brackets the keys that must hold it (`_bracket`), or sends the row to the fallback.
"""
from __future__ import annotations

from ..online_softmax import lanes_of, lanes_reduce, safe_shift
from .keys_and_noise import gumbel, key16, key16_value, row_params, value_key16
from ..triton_compat import tl, triton


@triton.jit
# [B, C, 4] fp32 out: max, sum exp(s - max), sum exp(key value - max), best Gumbel score
# [B, C, 5] int32 out: first argmax, max key, best Gumbel score's index, top cell, its least key
def _chunk_stats_kernel(
    logits_ptr,  # [B, V] fp32/bf16/fp16, rows `stride` apart
    temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, pos_ptr,  # [B] sampling parameters
    stat_ptr,
    arg_ptr,
    profile_ptr,  # [B, C, PROFILE] int16 out (rows with a cut): tokens per cell below the top cell
    V, stride,
    CHUNK: tl.constexpr, PROFILE: tl.constexpr, CELLS_PER_UNIT: tl.constexpr,
    IS_FP32: tl.constexpr, IS_FP16: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    inv_temp, top_k, top_p, greedy, cut, second = row_params(temp_ptr, top_k_ptr, top_p_ptr,
                                                             min_p_ptr, row, V)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = offs < V
    x = tl.load(logits_ptr + row.to(tl.int64) * stride + offs, mask=valid, other=float("-inf"))
    s = x.to(tl.float32) * inv_temp
    # The chunk's partial log-softmax state (max, sum exp), merged per row by _merge_kernel.
    s_lanes, sum_lanes, t_lanes = lanes_of(s)
    s_max, s_sum, _ = lanes_reduce(s_lanes, sum_lanes, t_lanes, False)
    key = tl.where(valid, key16(x, IS_FP32), -32768)
    # == s for bf16/fp16
    s_key = tl.where(valid, key16_value(key, IS_FP16) * inv_temp, float("-inf"))
    shift = safe_shift(s_max)  # a row of -inf: sums 0, not NaN
    out = (row * chunks + chunk).to(tl.int64)
    tl.store(stat_ptr + out * 4, s_max)
    tl.store(stat_ptr + out * 4 + 1, s_sum)
    tl.store(stat_ptr + out * 4 + 2, tl.sum(tl.where(valid, tl.exp(s_key - shift), 0.0)))
    tl.store(arg_ptr + out * 5, chunk * CHUNK + tl.argmax(s, 0))
    tl.store(arg_ptr + out * 5 + 1, tl.max(key))
    if (greedy == 0) & (second == 0):  # a plain draw: argmax(s + Gumbel) over the whole row
        score = tl.where(valid, s + gumbel(seed_ptr, pos_ptr, row, offs), float("-inf"))
        tl.store(stat_ptr + out * 4 + 3, tl.max(score))
        tl.store(arg_ptr + out * 5 + 2, chunk * CHUNK + tl.argmax(score, 0))
    if cut:
        # Cells on the lattice floor(-s * CELLS_PER_UNIT) (a power of 2: exact), counted from this
        # chunk's top cell; -inf, and anything past the profile, lands in the last cell.
        cell = tl.floor(-s_key * CELLS_PER_UNIT)
        top = tl.minimum(tl.maximum(tl.min(cell), -1073741824.0), 1073741824.0)
        # A cell above the clamped top (scaled logits past 2^30 cells: extreme inverse temperatures)
        # counts in cell 0, one past the profile in the last: histogram bins stay in [0, PROFILE).
        depth = cell - top
        depth = tl.where(depth < 0, 0.0, depth)
        depth = tl.where(depth < PROFILE - 1, depth, PROFILE - 1).to(tl.int32)  # NaN (all -inf) too
        tl.store(arg_ptr + out * 5 + 3, top.to(tl.int32))
        # near 0 a cell spans thousands of keys: its least key bounds a cut in it (a flat row's)
        tl.store(arg_ptr + out * 5 + 4, tl.min(tl.where(depth == 0, key, 32767)))
        counts = tl.histogram(depth, PROFILE)
        tl.store(profile_ptr + out * PROFILE + tl.arange(0, PROFILE), counts.to(tl.int16))


@triton.jit
def _bracket(profile_ptr, arg_ptr, row, chunks, tops, top_cell_keys, m, z_key, top_key, inv_temp,
             top_k, top_p, V, PROFILE: tl.constexpr, CELLS_PER_UNIT: tl.constexpr,
             WINDOW: tl.constexpr, SLACK: tl.constexpr, IS_FP32: tl.constexpr,
             IS_FP16: tl.constexpr):
    """(fits, key_lo, key_hi) of a row with a cut: the keys that must hold it, from the chunks'
    profiles (tops, top_cell_keys [CHUNKS]: each chunk's top cell and that cell's least key)."""
    i = tl.arange(0, PROFILE)
    first = (row * chunks).to(tl.int64)
    a = tl.min(tops)
    # the least key of the row's top cell
    top_cell_key = tl.min(tl.where(tops == a, top_cell_keys, 32767))
    # Row cell i (below the row's top cell a) is chunk c's cell i - (a_c - a): exact for i < PROFILE
    # - 1.
    counts = tl.zeros([PROFILE], dtype=tl.int32)
    for c in range(0, chunks):
        j = i - (tl.load(arg_ptr + (first + c) * 5 + 3) - a)
        counts += tl.load(profile_ptr + (first + c) * PROFILE + j,
                          mask=(j >= 0) & (j < PROFILE - 1), other=0).to(tl.int32)
    # Cell i holds key-valued scaled logits in (-(a + i + 1) / CPU, -(a + i) / CPU]: its mass
    # bounds.
    upper = (-a).to(tl.float32) / CELLS_PER_UNIT - m - i.to(tl.float32) / CELLS_PER_UNIT
    slack = SLACK + 1e-6 * tl.abs(m)
    hi = counts.to(tl.float32) * tl.exp(upper + slack)
    lo = counts.to(tl.float32) * tl.exp(upper - 1.0 / CELLS_PER_UNIT - slack)
    # The mass of cells <= i: their bounds, or the row's exact total less the bounds of the rest
    # (the tokens past the profile at most at its last cell's top): tight when one cell holds it
    # all.
    deep_hi = (V - tl.sum(counts)).to(tl.float32) * tl.exp(
        tl.max(tl.where(i == PROFILE - 1, upper, -1e30)) + slack)
    hi_sum = tl.cumsum(hi, 0)
    lo_sum = tl.cumsum(lo, 0)
    above_hi = tl.minimum(hi_sum, z_key - (tl.sum(lo) - lo_sum)) * (1 + SLACK)
    above_lo = tl.maximum(lo_sum, z_key - (tl.sum(hi) + deep_hi - hi_sum)) * (1 - SLACK)
    has_k = top_k < V
    cell_k = tl.min(tl.where(tl.cumsum(counts, 0) >= top_k, i, PROFILE))
    z_lo = tl.where(has_k, tl.max(tl.where(i < cell_k, above_lo, 0.0)), z_key * (1 - SLACK))
    z_hi = tl.where(has_k, tl.max(tl.where(i <= cell_k, above_hi, 0.0)), z_key * (1 + SLACK))
    cell_p_hi = tl.min(tl.where(above_hi >= top_p * z_lo, i, PROFILE))  # the cut is no higher
    cell_p_lo = tl.min(tl.where(above_lo >= top_p * z_hi, i, PROFILE))  # and no lower
    has_p = top_p < 1
    top_cell = tl.where(has_p, tl.where(has_k, tl.minimum(cell_p_hi, cell_k), cell_p_hi), cell_k)
    bottom_cell = tl.where(has_k, cell_k, cell_p_lo)  # with top-k: down to its cut (the top-p mass)
    upper_edge = (-(a + top_cell)).to(tl.float32) / CELLS_PER_UNIT / inv_temp
    lower_edge = (-(a + bottom_cell + 1)).to(tl.float32) / CELLS_PER_UNIT / inv_temp
    # 2 keys against rounding
    key_hi = tl.minimum(value_key16(upper_edge, IS_FP32, IS_FP16) + 2, top_key)
    key_lo = tl.maximum(value_key16(lower_edge, IS_FP32, IS_FP16) - 2, -32768)
    # the cells below it empty
    only_top = tl.sum(tl.where((i > 0) & (i <= bottom_cell), counts, 0)) == 0
    key_lo = tl.where(only_top, tl.maximum(key_lo, top_cell_key), key_lo)
    fits = (bottom_cell < PROFILE - 1) & (key_hi - key_lo < WINDOW)
    return fits, key_lo, key_hi


@triton.jit
# [B, 3] fp32 out: the row's max (scaled), the score floor of a winner, sum exp(key value - max)
# [B, 4] int32 out: mode (0 no cut, 1 window, 2 fallback), window's lowest and top key, top key
def _merge_kernel(
    stat_ptr, arg_ptr, profile_ptr, seed_ptr, pos_ptr,  # as written by _chunk_stats_kernel
    temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr,  # [B] sampling parameters
    row_ptr,
    win_ptr,
    token_ptr,  # [B] int64 out (rows without a 2nd pass)
    logprob_ptr,  # [B] fp32 out (rows without a 2nd pass; 2nd-pass rows: 0, or NaN for a NaN row)
    V, chunks,
    CHUNKS: tl.constexpr, PROFILE: tl.constexpr, CELLS_PER_UNIT: tl.constexpr, WINDOW: tl.constexpr,
    SLACK: tl.constexpr, IS_FP32: tl.constexpr, IS_FP16: tl.constexpr,
):
    row = tl.program_id(0)
    inv_temp, top_k, top_p, greedy, cut, second = row_params(temp_ptr, top_k_ptr, top_p_ptr,
                                                             min_p_ptr, row, V)
    c = tl.arange(0, CHUNKS)
    here = (row * chunks + c).to(tl.int64)
    live = c < chunks
    c_max = tl.load(stat_ptr + here * 4, mask=live, other=float("-inf"))
    # The chunks' partial states merge as the lanes of one row do (the key-valued sums alike).
    no_entropy = tl.zeros([CHUNKS], dtype=tl.float32)
    m, z, _ = lanes_reduce(c_max, tl.load(stat_ptr + here * 4 + 1, mask=live, other=0.0),
                           no_entropy, False)
    _, z_key, _ = lanes_reduce(c_max, tl.load(stat_ptr + here * 4 + 2, mask=live, other=0.0),
                               no_entropy, False)
    top_key = tl.max(tl.load(arg_ptr + here * 5 + 1, mask=live, other=-32768))
    # A NaN row matches no maximum: the token is clamped into the vocabulary, so that the NaN
    # reaches the caller as the log-prob, never as an index past the embedding (a device assert).
    greedy_token = tl.minimum(tl.min(
        tl.where(c_max == m, tl.load(arg_ptr + here * 5, mask=live, other=0), 2147483647)), V - 1)
    if greedy:
        tl.store(token_ptr + row, greedy_token.to(tl.int64))
        tl.store(logprob_ptr + row, -tl.log(z))  # the max's own log-prob: 0 - log sum exp(s - max)
    # a plain draw: done but for the token's scaled logit, added by _finish
    if (greedy == 0) & (second == 0):
        # The chunks wrote their best Gumbel score and its token for plain draws only: read them
        # here, never the unwritten workspace of other rows.
        c_score = tl.load(stat_ptr + here * 4 + 3, mask=live, other=float("-inf"))
        drawn = tl.minimum(tl.min(
            tl.where(c_score == tl.max(c_score),
                     tl.load(arg_ptr + here * 5 + 2, mask=live, other=0), 2147483647)), V - 1)
        tl.store(token_ptr + row, drawn.to(tl.int64))
        tl.store(logprob_ptr + row, -m - tl.log(z))
    if second:
        # The most likely token is always kept, so a token scoring below it never wins (a hair lower
        # against any difference in rounding: more candidates, never fewer).
        floor = m + gumbel(seed_ptr, pos_ptr, row, greedy_token)
        floor = floor - 1e-6 * (1.0 + tl.abs(floor))
        mode = tl.full((), 0, tl.int32)
        key_lo = tl.full((), -32768, tl.int32)
        key_hi = tl.full((), -32769, tl.int32)  # no cut: every token is above the (empty) window
        if cut:
            tops = tl.load(arg_ptr + here * 5 + 3, mask=live, other=1073741824)
            top_cell_keys = tl.load(arg_ptr + here * 5 + 4, mask=live, other=32767)
            fits, lo, hi = _bracket(profile_ptr, arg_ptr, row, chunks, tops, top_cell_keys, m,
                                    z_key, top_key, inv_temp, top_k, top_p, V, PROFILE,
                                    CELLS_PER_UNIT, WINDOW, SLACK, IS_FP32, IS_FP16)
            mode = tl.where(fits, 1, 2)
            key_lo = tl.where(fits, lo, 32768)  # the fallback: nothing above, an empty window
            key_hi = tl.where(fits, hi, 32767)
        # The second pass adds this to its log-prob: 0, or NaN where a logit is NaN or +inf (the
        # whole row's sum is then NaN), which the kept tokens' sum alone would not show.
        tl.store(logprob_ptr + row, z * 0.0)
        tl.store(row_ptr + row * 3, m)
        tl.store(row_ptr + row * 3 + 1, floor)
        tl.store(row_ptr + row * 3 + 2, z_key)
        tl.store(win_ptr + row * 4, mode)
        tl.store(win_ptr + row * 4 + 1, key_lo)
        tl.store(win_ptr + row * 4 + 2, key_hi)
        tl.store(win_ptr + row * 4 + 3, top_key)
