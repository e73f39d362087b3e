"""The split-row sampler: each row's vocabulary is cut into CHUNK-sized pieces, one Triton program
each, and merged; no sort, no per-row histogram of the whole key range, and (but in the fallback)
no serial search: the logits read twice.

Same semantics as the torch reference `sampler.sample_torch` (its oracle; the rules are in
sampler.py's docstring: cuts at 16-bit order-key granularity, ties kept). Four launches, whatever
the batch (a row's chunks run in parallel, so one row alone spreads over vocab / CHUNK programs):

1. `_chunk_stats_kernel` [rows, chunks] reads the logits once: each chunk's max, sum of exp, first
   argmax, and (rows that draw without a cut) its best Gumbel score. Rows with top-k or top-p also
   count the chunk's tokens per profile cell, a 1/CELLS_PER_UNIT-wide step of the key-valued scaled
   logit below the chunk's own top cell (cells on one lattice, so the chunks' profiles align);
2. `_merge_kernel` [rows] merges the chunks (max, sum, greedy token, plain draw: those rows are
   done) and, for rows with a cut, adds the profiles into the row's: exact counts and, per cell,
   bounds of the mass, hence a bracket of keys that must hold the cut (everything above it surely
   kept, everything below surely cut). A bracket wider than WINDOW keys, or deeper than the
   profile, sends the row to the fallback;
3. `_window_kernel` [rows, chunks] reads the logits of the rows with a cut (or min-p) again: per
   chunk the count and mass of the tokens above the bracket and their best Gumbel score; the
   tokens inside it are counted per key into the row's WINDOW-key window (atomics for these few
   only), which also keeps per key the best packed (Gumbel score, index) of the tokens that can
   still win (score >= the row's most likely token's) and, for fp32 logits, their exact mass;
4. `_finish_kernel` [rows] walks the window from its top key to the exact cut (top-k counts, then
   top-p mass within the top-k set), checks that the bracket held it, draws the best kept token and
   its log-prob, and empties the window bins it used. The fallback (a row whose bracket did not
   fit, or missed) walks the row's keys WINDOW at a time, counting each slice in one program's
   registers, then draws in one more pass: correct for any row, slower, a read per slice.

The window is a `SamplerWorkspace` the caller owns and passes in (the engine's model runner keeps one
for its largest batch, created once, so a captured CUDA graph keeps valid pointers): never cleared by
a separate op, emptied by the kernel that read it. Without one, a call makes a fresh empty window
(three fill ops more). No state lives in this module.

Bytes loaded, counted in the interpreter (`bench/traffic_kernels.KernelTraffic`; bf16 logits,
vocabulary 151936, the model-like rows of tests/bench/test_traffic_kernels.py), in reads of the
logits: top-p 0.9 2.12 (3.97 with the old per-row 65536-bin histogram), top-k 50 2.12, min-p 0.1
2.02, a flat row at top-p 0.9 2.15 (every token in one key: one atomic per chunk), plain 1.01: one
read in pass 1, ~0.1 in the merge (the profiles), one in pass 2 plus the window's atomics. Rows that
fall back cost a read per WINDOW-key slice walked (a flat row never does: its one key fits).
"""
from __future__ import annotations

import torch

from .online_softmax import lanes_of, lanes_reduce, safe_shift
from .sampling_bits import gumbel, key16, key16_value, pack_score, unpack_score, value_key16
from .triton_compat import tl, triton

CHUNK = 4096  # tokens per program; fixed (not chosen by batch), so a row's numbers never depend on it
CELLS_PER_UNIT = 16  # profile cells per unit of scaled logit: a cell's mass is known within e^(1/16)
PROFILE = 512  # cells per chunk (the last: everything deeper): 32 units, past any top-p cut of V < 4e6
WINDOW = 2048  # keys of a row's window: per key its count, best packed score and (fp32) fixed-point mass
_FIXED = 2.0 ** 40  # fp32 window masses exp(s - max) <= 1 as int64 sums: exact, in any order
_EMPTY = -(2 ** 63)  # an empty best-score bin (below every packed score)
_RECORDS = 3  # rounds of a chunk's best-of-the-keys-above before its window candidates all go atomic
_SLACK = 1e-4  # relative slack of the merge's mass bounds against rounding (a miss costs time, not truth)


@triton.jit
def _row_params(temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, row, V):
    """(inverse temperature, top-k or V when off, top-p, greedy, has top-k/top-p cut, needs a 2nd pass)."""
    temp = tl.load(temp_ptr + row)
    greedy = temp == 0
    inv_temp = 1.0 / tl.where(greedy, 1.0, temp)
    top_k = tl.load(top_k_ptr + row)
    top_k = tl.where((top_k > 0) & (top_k < V), top_k, V)
    top_p = tl.load(top_p_ptr + row)
    cut = (greedy == 0) & ((top_k < V) | (top_p < 1))
    second = cut | ((greedy == 0) & (tl.load(min_p_ptr + row) > 0))
    return inv_temp, top_k, top_p, greedy, cut, second


@triton.jit
def _log_min_p(min_p_ptr, row):
    """log(min_p), -inf when off: a token is kept by min-p when its scaled logit - max >= this."""
    min_p = tl.load(min_p_ptr + row)
    return tl.where(min_p > 0, tl.log(tl.maximum(min_p, 1e-38)), float("-inf"))


@triton.jit
def _chunk_stats_kernel(
    logits_ptr,  # [B, V] fp32/bf16/fp16, rows `stride` apart
    temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, pos_ptr,  # [B] sampling parameters
    stat_ptr,  # [B, C, 4] fp32 out: max, sum exp(s - max), sum exp(key value - max), best Gumbel score
    arg_ptr,  # [B, C, 5] int32 out: first argmax, max key, best Gumbel score's index, top cell, its least key
    profile_ptr,  # [B, C, PROFILE] int16 out (rows with a cut): tokens per cell below the top cell
    V, stride,
    CHUNK: tl.constexpr, PROFILE: tl.constexpr, CELLS_PER_UNIT: tl.constexpr,
    IS_FP32: tl.constexpr, IS_FP16: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    inv_temp, top_k, top_p, greedy, cut, second = _row_params(temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, row, V)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = offs < V
    x = tl.load(logits_ptr + row.to(tl.int64) * stride + offs, mask=valid, other=float("-inf"))
    s = x.to(tl.float32) * inv_temp
    # The chunk's partial log-softmax state (max, sum exp), merged per row by _merge_kernel.
    s_lanes, sum_lanes, t_lanes = lanes_of(s)
    s_max, s_sum, _ = lanes_reduce(s_lanes, sum_lanes, t_lanes, False)
    key = tl.where(valid, key16(x, IS_FP32), -32768)
    s_key = tl.where(valid, key16_value(key, IS_FP16) * inv_temp, float("-inf"))  # == s for bf16/fp16
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
        depth = cell - top
        depth = tl.where(depth < PROFILE - 1, depth, PROFILE - 1).to(tl.int32)  # NaN (all -inf) too
        tl.store(arg_ptr + out * 5 + 3, top.to(tl.int32))
        # near 0 a cell spans thousands of keys: its least key bounds a cut in it (a flat row's)
        tl.store(arg_ptr + out * 5 + 4, tl.min(tl.where(depth == 0, key, 32767)))
        counts = tl.histogram(depth, PROFILE)
        tl.store(profile_ptr + out * PROFILE + tl.arange(0, PROFILE), counts.to(tl.int16))


@triton.jit
def _bracket(profile_ptr, arg_ptr, row, chunks, tops, top_cell_keys, m, z_key, top_key, inv_temp, top_k, top_p, V,
             PROFILE: tl.constexpr, CELLS_PER_UNIT: tl.constexpr, WINDOW: tl.constexpr, SLACK: tl.constexpr,
             IS_FP32: tl.constexpr, IS_FP16: tl.constexpr):
    """(fits, key_lo, key_hi) of a row with a cut: the keys that must hold it, from the chunks' profiles
    (tops, top_cell_keys [CHUNKS]: each chunk's top cell and that cell's least key)."""
    i = tl.arange(0, PROFILE)
    first = (row * chunks).to(tl.int64)
    a = tl.min(tops)
    top_cell_key = tl.min(tl.where(tops == a, top_cell_keys, 32767))  # the least key of the row's top cell
    # Row cell i (below the row's top cell a) is chunk c's cell i - (a_c - a): exact for i < PROFILE - 1.
    counts = tl.zeros([PROFILE], dtype=tl.int32)
    for c in range(0, chunks):
        j = i - (tl.load(arg_ptr + (first + c) * 5 + 3) - a)
        counts += tl.load(profile_ptr + (first + c) * PROFILE + j, mask=(j >= 0) & (j < PROFILE - 1),
                          other=0).to(tl.int32)
    # Cell i holds key-valued scaled logits in (-(a + i + 1) / CPU, -(a + i) / CPU]: its mass bounds.
    upper = (-a).to(tl.float32) / CELLS_PER_UNIT - m - i.to(tl.float32) / CELLS_PER_UNIT
    slack = SLACK + 1e-6 * tl.abs(m)
    hi = counts.to(tl.float32) * tl.exp(upper + slack)
    lo = counts.to(tl.float32) * tl.exp(upper - 1.0 / CELLS_PER_UNIT - slack)
    # The mass of cells <= i: their bounds, or the row's exact total less the bounds of the rest
    # (the tokens past the profile at most at its last cell's top): tight when one cell holds it all.
    deep_hi = (V - tl.sum(counts)).to(tl.float32) * tl.exp(tl.max(tl.where(i == PROFILE - 1, upper, -1e30)) + slack)
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
    key_hi = tl.minimum(value_key16(upper_edge, IS_FP32, IS_FP16) + 2, top_key)  # 2 keys against rounding
    key_lo = tl.maximum(value_key16(lower_edge, IS_FP32, IS_FP16) - 2, -32768)
    only_top = tl.sum(tl.where((i > 0) & (i <= bottom_cell), counts, 0)) == 0  # the cells below it empty
    key_lo = tl.where(only_top, tl.maximum(key_lo, top_cell_key), key_lo)
    fits = (bottom_cell < PROFILE - 1) & (key_hi - key_lo < WINDOW)
    return fits, key_lo, key_hi


@triton.jit
def _merge_kernel(
    stat_ptr, arg_ptr, profile_ptr, seed_ptr, pos_ptr,  # as written by _chunk_stats_kernel
    temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr,  # [B] sampling parameters
    row_ptr,  # [B, 3] fp32 out: the row's max (scaled), the score floor of a winner, sum exp(key value - max)
    win_ptr,  # [B, 4] int32 out: mode (0 no cut, 1 window, 2 fallback), window's lowest and top key, top key
    token_ptr,  # [B] int64 out (rows without a 2nd pass)
    logprob_ptr,  # [B] fp32 out (rows without a 2nd pass)
    V, chunks,
    CHUNKS: tl.constexpr, PROFILE: tl.constexpr, CELLS_PER_UNIT: tl.constexpr, WINDOW: tl.constexpr,
    SLACK: tl.constexpr, IS_FP32: tl.constexpr, IS_FP16: tl.constexpr,
):
    row = tl.program_id(0)
    inv_temp, top_k, top_p, greedy, cut, second = _row_params(temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, row, V)
    c = tl.arange(0, CHUNKS)
    here = (row * chunks + c).to(tl.int64)
    live = c < chunks
    c_max = tl.load(stat_ptr + here * 4, mask=live, other=float("-inf"))
    # The chunks' partial states merge as the lanes of one row do (the key-valued sums alike).
    no_entropy = tl.zeros([CHUNKS], dtype=tl.float32)
    m, z, _ = lanes_reduce(c_max, tl.load(stat_ptr + here * 4 + 1, mask=live, other=0.0), no_entropy, False)
    _, z_key, _ = lanes_reduce(c_max, tl.load(stat_ptr + here * 4 + 2, mask=live, other=0.0), no_entropy, False)
    top_key = tl.max(tl.load(arg_ptr + here * 5 + 1, mask=live, other=-32768))
    greedy_token = tl.min(tl.where(c_max == m, tl.load(arg_ptr + here * 5, mask=live, other=0), 2147483647))
    c_score = tl.load(stat_ptr + here * 4 + 3, mask=live, other=float("-inf"))  # plain draws only
    drawn = tl.min(tl.where(c_score == tl.max(c_score), tl.load(arg_ptr + here * 5 + 2, mask=live, other=0),
                            2147483647))
    if greedy:
        tl.store(token_ptr + row, greedy_token.to(tl.int64))
        tl.store(logprob_ptr + row, -tl.log(z))  # the max's own log-prob: 0 - log sum exp(s - max)
    if (greedy == 0) & (second == 0):  # a plain draw: done but for the token's scaled logit, added by _finish
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
            fits, lo, hi = _bracket(profile_ptr, arg_ptr, row, chunks, tops, top_cell_keys, m, z_key, top_key,
                                    inv_temp, top_k, top_p, V, PROFILE, CELLS_PER_UNIT, WINDOW, SLACK, IS_FP32, IS_FP16)
            mode = tl.where(fits, 1, 2)
            key_lo = tl.where(fits, lo, 32768)  # the fallback: nothing above, an empty window
            key_hi = tl.where(fits, hi, 32767)
        tl.store(row_ptr + row * 3, m)
        tl.store(row_ptr + row * 3 + 1, floor)
        tl.store(row_ptr + row * 3 + 2, z_key)
        tl.store(win_ptr + row * 4, mode)
        tl.store(win_ptr + row * 4 + 1, key_lo)
        tl.store(win_ptr + row * 4 + 2, key_hi)
        tl.store(win_ptr + row * 4 + 3, top_key)


@triton.jit
def _window_kernel(
    logits_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, pos_ptr,
    row_ptr, win_ptr,  # as written by _merge_kernel
    part_ptr,  # [B, C, 3] fp32 out: above the window: sum exp(key value - max), kept mass, best score
    part_arg_ptr,  # [B, C, 2] int32 out: above the window: tokens, index of the best score
    count_ptr, best_ptr, fixed_ptr,  # [rows, WINDOW] the window: int32 counts, int64 packed best, int64 mass
    V, stride,
    CHUNK: tl.constexpr, WINDOW: tl.constexpr, FIXED: tl.constexpr, EMPTY: tl.constexpr, RECORDS: tl.constexpr,
    IS_FP32: tl.constexpr, IS_FP16: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    inv_temp, top_k, top_p, greedy, cut, second = _row_params(temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, row, V)
    mode = tl.load(win_ptr + row * 4)
    if second & (mode != 2):
        m = tl.load(row_ptr + row * 3)
        key_lo = tl.load(win_ptr + row * 4 + 1)
        key_hi = tl.load(win_ptr + row * 4 + 2)
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        valid = offs < V
        x = tl.load(logits_ptr + row.to(tl.int64) * stride + offs, mask=valid, other=float("-inf"))
        s = x.to(tl.float32) * inv_temp
        key = key16(x, IS_FP32)
        passes = s - m >= _log_min_p(min_p_ptr, row)
        score = s + gumbel(seed_ptr, pos_ptr, row, offs)
        above = valid & (key > key_hi)
        kept = above & passes
        kept_score = tl.where(kept, score, float("-inf"))
        out = (row * tl.num_programs(1) + chunk).to(tl.int64)
        key_mass = tl.exp(key16_value(key, IS_FP16) * inv_temp - m)
        tl.store(part_ptr + out * 3, tl.sum(tl.where(above, key_mass, 0.0)))
        tl.store(part_ptr + out * 3 + 1, tl.sum(tl.where(kept, tl.exp(s - m), 0.0)))
        tl.store(part_ptr + out * 3 + 2, tl.max(kept_score))
        tl.store(part_arg_ptr + out * 2, tl.sum(above.to(tl.int32)))
        tl.store(part_arg_ptr + out * 2 + 1, chunk * CHUNK + tl.argmax(kept_score, 0))
        if mode == 1:
            inside = valid & (key >= key_lo) & (key <= key_hi)
            # The chunk's counts per key first (outside tokens land in bin 0 and are taken back out),
            # then one atomic per key it holds.
            lane = tl.arange(0, WINDOW)
            counts = tl.histogram(tl.where(inside, key - key_lo, 0), WINDOW)
            counts -= tl.where(lane == 0, tl.sum((inside == 0).to(tl.int32)), 0)
            window = row.to(tl.int64) * WINDOW
            tl.atomic_add(count_ptr + window + lane, counts, mask=counts > 0)
            floor = tl.load(row_ptr + row * 3 + 1)
            candidate = inside & passes & (score >= floor)
            packed = tl.where(candidate, pack_score(score, offs), EMPTY)
            # A candidate beaten by one of a key as high is never drawn (whenever it is kept, so is
            # the other): send the chunk's best, then the best of the keys above it, a few rounds,
            # then whatever is left.
            todo = candidate
            send = tl.zeros([CHUNK], dtype=tl.int1)
            for _ in tl.static_range(RECORDS):
                best = tl.max(tl.where(todo, packed, EMPTY))
                is_best = todo & (packed == best)
                send = send | is_best
                todo = todo & (key > tl.max(tl.where(is_best, key, -32769)))
            send = send | todo
            bins = window + key - key_lo
            tl.atomic_max(best_ptr + bins, packed, mask=send)
            if IS_FP32:  # the keys' exact masses differ within a key: summed exactly as fixed point
                fixed = (tl.exp(s - m) * FIXED).to(tl.int64)
                tl.atomic_add(fixed_ptr + bins, fixed, mask=inside & passes)


@triton.jit
def _bin_mass(counts, keys, inv_temp, m, IS_FP16: tl.constexpr):
    """Mass of keys' bins: count * exp(key value / temperature - max)."""
    return tl.where(counts > 0, counts * tl.exp(key16_value(keys, IS_FP16) * inv_temp - m), 0.0)


@triton.jit
def _slice_counts(logits_row, V, top, CHUNK: tl.constexpr, WINDOW: tl.constexpr, IS_FP32: tl.constexpr):
    """[WINDOW] int32: tokens of key top - lane in one row (the fallback: a loop over the row)."""
    lane = tl.arange(0, WINDOW)
    counts = tl.zeros([WINDOW], dtype=tl.int32)
    for start in range(0, V, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        valid = offs < V
        depth = top - key16(tl.load(logits_row + offs, mask=valid, other=0.0), IS_FP32)
        inside = valid & (depth >= 0) & (depth < WINDOW)
        # the outside tokens land in bin 0 and are taken back out
        counts += tl.histogram(tl.where(inside, depth, 0), WINDOW)
        counts -= tl.where(lane == 0, tl.sum((inside == 0).to(tl.int32)), 0)
    return counts


@triton.jit
def _fallback_cut(logits_row, V, top_key, m, z_key, inv_temp, top_k, top_p,
                  CHUNK: tl.constexpr, WINDOW: tl.constexpr, IS_FP32: tl.constexpr, IS_FP16: tl.constexpr):
    """The cut key of a row whose bracket did not hold it: the keys walked from the top, WINDOW a slice."""
    lane = tl.arange(0, WINDOW)
    # Top-k: the highest key whose count from the top reaches k (no cut: the lowest key).
    cut_k = tl.full((), -32768, tl.int32)
    z_k = z_key
    found = top_k >= V
    top = top_key
    count_above = tl.zeros((), tl.int32)
    mass_above = tl.zeros((), tl.float32)
    while (found == 0) & (top >= -32768):
        counts = _slice_counts(logits_row, V, top, CHUNK, WINDOW, IS_FP32)
        mass = _bin_mass(counts, top - lane, inv_temp, m, IS_FP16)
        first = tl.min(tl.where(count_above + tl.cumsum(counts, 0) >= top_k, lane, WINDOW))
        hit = first < WINDOW
        cut_k = tl.where(hit, top - first, cut_k)
        z_k = tl.where(hit, mass_above + tl.sum(tl.where(lane <= first, mass, 0.0)), z_k)
        found = found | hit
        count_above += tl.sum(counts)
        mass_above += tl.sum(mass)
        top -= WINDOW
    # Top-p: the highest key (of the top-k set) whose mass from the top reaches top_p of its mass.
    cut = cut_k
    target = top_p * z_k
    found = top_p >= 1
    top = top_key
    mass_above = tl.zeros((), tl.float32)
    while (found == 0) & (top >= cut_k):
        counts = _slice_counts(logits_row, V, top, CHUNK, WINDOW, IS_FP32)
        counts = tl.where(top - lane >= cut_k, counts, 0)
        mass = _bin_mass(counts, top - lane, inv_temp, m, IS_FP16)
        first = tl.min(tl.where((counts > 0) & (mass_above + tl.cumsum(mass, 0) >= target), lane, WINDOW))
        hit = first < WINDOW
        cut = tl.where(hit, top - first, cut)
        found = found | hit
        mass_above += tl.sum(mass)
        top -= WINDOW
    return cut


@triton.jit
def _finish_kernel(
    logits_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, pos_ptr,
    row_ptr, win_ptr, part_ptr, part_arg_ptr, count_ptr, best_ptr, fixed_ptr,  # as written above
    token_ptr,  # [B] int64: written here for rows with a 2nd pass, read for the plain draws
    logprob_ptr,  # [B] fp32: idem (plain draws: -max - log z, the token's scaled logit added here)
    V, stride, chunks,
    CHUNKS: tl.constexpr, CHUNK: tl.constexpr, WINDOW: tl.constexpr, FIXED: tl.constexpr, EMPTY: tl.constexpr,
    IS_FP32: tl.constexpr, IS_FP16: tl.constexpr,
):
    row = tl.program_id(0)
    inv_temp, top_k, top_p, greedy, cut, second = _row_params(temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, row, V)
    logits_row = logits_ptr + row.to(tl.int64) * stride
    if second:
        m = tl.load(row_ptr + row * 3)
        z_key = tl.load(row_ptr + row * 3 + 2)
        mode = tl.load(win_ptr + row * 4)
        key_lo = tl.load(win_ptr + row * 4 + 1)
        key_hi = tl.load(win_ptr + row * 4 + 2)
        log_min_p = _log_min_p(min_p_ptr, row)
        ok = mode != 2
        token = tl.zeros((), tl.int32)
        z = tl.zeros((), tl.float32)
        if mode != 2:
            c = tl.arange(0, CHUNKS)
            here = (row * chunks + c).to(tl.int64)
            live = c < chunks
            count_above = tl.sum(tl.load(part_arg_ptr + here * 2, mask=live, other=0))
            mass_above = tl.sum(tl.load(part_ptr + here * 3, mask=live, other=0.0))
            kept_above = tl.sum(tl.load(part_ptr + here * 3 + 1, mask=live, other=0.0))
            c_score = tl.load(part_ptr + here * 3 + 2, mask=live, other=float("-inf"))
            best_above = tl.max(c_score)
            token_above = tl.min(tl.where(c_score == best_above,
                                          tl.load(part_arg_ptr + here * 2 + 1, mask=live, other=0), 2147483647))
            lane = tl.arange(0, WINDOW)
            keys = key_hi - lane
            inside = keys >= key_lo
            bins = row.to(tl.int64) * WINDOW + keys - key_lo
            counts = tl.load(count_ptr + bins, mask=inside, other=0)
            mass = _bin_mass(counts, keys, inv_temp, m, IS_FP16)
            # Top-k within the window: the k-th token from the top, none of it above the window.
            cut_k = tl.full((), -32768, tl.int32)
            z_k = z_key
            if top_k < V:
                first = tl.min(tl.where(count_above + tl.cumsum(counts, 0) >= top_k, lane, WINDOW))
                ok = ok & (count_above < top_k) & (first < WINDOW)
                cut_k = key_hi - first
                z_k = mass_above + tl.sum(tl.where(lane <= first, mass, 0.0))
            cut_key = cut_k
            if top_p < 1:
                target = top_p * z_k
                first = tl.min(tl.where((counts > 0) & (keys >= cut_k) & (mass_above + tl.cumsum(mass, 0) >= target),
                                        lane, WINDOW))
                # held: the mass above the window is short of the target (or nothing is above), and
                # the target is reached in the window (or top-k's cut, in it, comes first)
                ok = ok & ((count_above == 0) | (mass_above < target)) & ((first < WINDOW) | (top_k < V))
                cut_key = tl.where(first < WINDOW, key_hi - first, cut_k)
            take = inside & (keys >= cut_key)
            w_score, w_token = unpack_score(tl.max(tl.load(best_ptr + bins, mask=take, other=EMPTY)))
            better = (w_score > best_above) | ((w_score == best_above) & (w_token < token_above))
            token = tl.where(better, w_token, token_above)
            if IS_FP32:
                z_window = tl.sum(tl.load(fixed_ptr + bins, mask=take, other=0)).to(tl.float32) * (1.0 / FIXED)
            else:  # a 16-bit key is its value: all its tokens pass min-p or none
                value = key16_value(keys, IS_FP16) * inv_temp
                z_window = tl.sum(tl.where(take & (value - m >= log_min_p), mass, 0.0))
            z = kept_above + z_window
            # Empty the bins this row used, for the next call.
            tl.store(count_ptr + bins, tl.zeros([WINDOW], dtype=tl.int32), mask=inside)
            tl.store(best_ptr + bins, tl.full([WINDOW], EMPTY, tl.int64), mask=inside)
            if IS_FP32:
                tl.store(fixed_ptr + bins, tl.zeros([WINDOW], dtype=tl.int64), mask=inside)
        if ok == 0:
            top_key = tl.load(win_ptr + row * 4 + 3)
            cut_key = _fallback_cut(logits_row, V, top_key, m, z_key, inv_temp, top_k, top_p,
                                    CHUNK, WINDOW, IS_FP32, IS_FP16)
            best = tl.full((), float("-inf"), tl.float32)
            z = tl.zeros((), tl.float32)
            for start in range(0, V, CHUNK):
                offs = start + tl.arange(0, CHUNK)
                valid = offs < V
                x = tl.load(logits_row + offs, mask=valid, other=float("-inf"))
                s = x.to(tl.float32) * inv_temp
                kept = valid & (key16(x, IS_FP32) >= cut_key) & (s - m >= log_min_p)
                score = tl.where(kept, s + gumbel(seed_ptr, pos_ptr, row, offs), float("-inf"))
                better = tl.max(score) > best  # ties: the earlier chunk's, the lower index
                token = tl.where(better, start + tl.argmax(score, 0), token)
                best = tl.where(better, tl.max(score), best)
                z += tl.sum(tl.where(kept, tl.exp(s - m), 0.0))
        s_token = tl.load(logits_row + token).to(tl.float32) * inv_temp
        tl.store(token_ptr + row, token.to(tl.int64))
        tl.store(logprob_ptr + row, s_token - m - tl.log(z))
    elif greedy == 0:
        token = tl.load(token_ptr + row)
        s_token = tl.load(logits_row + token).to(tl.float32) * inv_temp
        tl.store(logprob_ptr + row, tl.load(logprob_ptr + row) + s_token)


class SamplerWorkspace:
    """The sampler's per-row key windows for up to `rows` rows, created empty: counts [rows, WINDOW]
    int32, best packed (score, index) [rows, WINDOW] int64, fixed-point mass [rows, WINDOW] int64
    (fp32 logits). Each call leaves the bins it used empty again, so one workspace serves every call
    made in order on one stream (not two calls at once)."""

    def __init__(self, rows: int, device):
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"SamplerWorkspace: rows={rows!r} must be an int >= 1")
        self.counts = torch.zeros(rows, WINDOW, dtype=torch.int32, device=device)
        self.best = torch.full((rows, WINDOW), _EMPTY, dtype=torch.int64, device=device)
        self.mass = torch.zeros(rows, WINDOW, dtype=torch.int64, device=device)

    @property
    def rows(self) -> int:
        return self.counts.shape[0]

    def is_empty(self) -> bool:
        """Every bin empty (a check for tests: it reads the whole window)."""
        return bool((self.counts == 0).all() and (self.best == _EMPTY).all() and (self.mass == 0).all())


def sample_triton(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps,
                  workspace: SamplerWorkspace | None = None):
    """The split-row sampler; arguments and results as `sampler.sample_torch` (logits [B, V] fp32 or
    bf16/fp16, read in their own dtype and computed in fp32). Returns (tokens [B] int64, logprobs [B]
    fp32). workspace: the key windows (>= B rows, on the logits' device), else a fresh one. A torch
    custom op (fusedrl::sample): one node to torch.compile, one op to a TorchDispatchMode."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    if workspace is None:
        workspace = SamplerWorkspace(max(1, logits.shape[0]), logits.device)
    elif workspace.rows < logits.shape[0] or workspace.counts.device != logits.device:
        raise ValueError(f"sample_triton: workspace of {workspace.rows} rows on {workspace.counts.device} "
                         f"for {logits.shape[0]} rows of logits on {logits.device}")
    return torch.ops.fusedrl.sample(logits, temperatures.float().contiguous(), top_ks.contiguous(),
                                     top_ps.float().contiguous(), seeds.contiguous(), positions.contiguous(),
                                     min_ps.float().contiguous(), workspace.counts, workspace.best, workspace.mass)


# The windows are mutated (and left empty again): declared, so that torch.compile orders calls on them.
@torch.library.custom_op("fusedrl::sample", mutates_args=("window_counts", "window_best", "window_mass"))
def _sample_op(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
               seeds: torch.Tensor, positions: torch.Tensor, min_ps: torch.Tensor, window_counts: torch.Tensor,
               window_best: torch.Tensor, window_mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, vocab = logits.shape
    tokens, logprobs = _sample_fake(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps,
                                    window_counts, window_best, window_mass)
    if batch == 0:
        return tokens, logprobs
    block = min(CHUNK, triton.next_power_of_2(vocab))  # a function of the vocabulary only
    chunks = triton.cdiv(vocab, block)
    padded = triton.next_power_of_2(chunks)
    params = (temperatures, top_ks, top_ps, min_ps)
    device = logits.device
    stats = torch.empty(batch, chunks, 4, dtype=torch.float32, device=device)
    args = torch.empty(batch, chunks, 5, dtype=torch.int32, device=device)
    profile = torch.empty(batch, chunks, PROFILE, dtype=torch.int16, device=device)
    rows = torch.empty(batch, 3, dtype=torch.float32, device=device)
    windows = torch.empty(batch, 4, dtype=torch.int32, device=device)
    part = torch.empty(batch, chunks, 3, dtype=torch.float32, device=device)
    part_args = torch.empty(batch, chunks, 2, dtype=torch.int32, device=device)
    window = (window_counts, window_best, window_mass)
    dtypes = dict(IS_FP32=logits.dtype == torch.float32, IS_FP16=logits.dtype == torch.float16)
    _chunk_stats_kernel[(batch, chunks)](logits, *params, seeds, positions, stats, args, profile, vocab,
                                         logits.stride(0), CHUNK=block, PROFILE=PROFILE,
                                         CELLS_PER_UNIT=CELLS_PER_UNIT, **dtypes)
    _merge_kernel[(batch,)](stats, args, profile, seeds, positions, *params, rows, windows, tokens, logprobs,
                            vocab, chunks, CHUNKS=padded, PROFILE=PROFILE, CELLS_PER_UNIT=CELLS_PER_UNIT,
                            WINDOW=WINDOW, SLACK=_SLACK, **dtypes)
    _window_kernel[(batch, chunks)](logits, *params, seeds, positions, rows, windows, part, part_args, *window,
                                    vocab, logits.stride(0), CHUNK=block, WINDOW=WINDOW, FIXED=_FIXED, EMPTY=_EMPTY,
                                    RECORDS=_RECORDS, **dtypes)
    _finish_kernel[(batch,)](logits, *params, seeds, positions, rows, windows, part, part_args, *window, tokens,
                             logprobs, vocab, logits.stride(0), chunks, CHUNKS=padded, CHUNK=block, WINDOW=WINDOW,
                             FIXED=_FIXED, EMPTY=_EMPTY, **dtypes)
    return tokens, logprobs


@_sample_op.register_fake
def _sample_fake(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps, window_counts, window_best,
                 window_mass):
    batch = logits.shape[0]
    return (torch.empty(batch, dtype=torch.int64, device=logits.device),
            torch.empty(batch, dtype=torch.float32, device=logits.device))
