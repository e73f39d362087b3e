"""The split-row sampler's last two launches (host side and the whole algorithm: sampler.py):

3. `_window_kernel` [rows, chunks] reads the logits of the rows with a cut (or min-p) again: per
   chunk the tokens above the bracket, and the tokens inside it counted per key into the row's
   window;
4. `_finish_kernel` [rows] walks the window to the exact cut, draws the best kept token and its
   log-prob and empties the window; a row whose bracket did not hold the cut walks its keys a
   window at a time instead (`_fallback_cut`).
"""
from __future__ import annotations

from .keys_and_noise import (gumbel, key16, key16_value, pack_score, row_log_min_p, row_params,
                   unpack_score)
from ..triton_compat import tl, triton


@triton.jit
# [B, C, 3] fp32 out: above the window: sum exp(key value - max), kept mass, best score
# [rows, WINDOW] the window: int32 counts, int64 packed best, int64 mass
def _window_kernel(
    logits_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, pos_ptr,
    row_ptr, win_ptr,  # as written by _merge_kernel
    part_ptr,
    part_arg_ptr,  # [B, C, 2] int32 out: above the window: tokens, index of the best score
    count_ptr, best_ptr, fixed_ptr,
    V, stride,
    CHUNK: tl.constexpr, WINDOW: tl.constexpr, FIXED: tl.constexpr, EMPTY: tl.constexpr,
    RECORDS: tl.constexpr, IS_FP32: tl.constexpr, IS_FP16: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    inv_temp, top_k, top_p, greedy, cut, second = row_params(temp_ptr, top_k_ptr, top_p_ptr,
                                                             min_p_ptr, row, V)
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
        passes = s - m >= row_log_min_p(min_p_ptr, row)
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
            # The chunk's counts per key first (outside tokens land in bin 0 and are taken back
            # out), then one atomic per key it holds.
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
def _slice_counts(logits_row, V, top, CHUNK: tl.constexpr, WINDOW: tl.constexpr,
                  IS_FP32: tl.constexpr):
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
                  CHUNK: tl.constexpr, WINDOW: tl.constexpr, IS_FP32: tl.constexpr,
                  IS_FP16: tl.constexpr):
    """The cut key of a row whose bracket did not hold it: the keys walked from the top, WINDOW a
    slice."""
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
        first = tl.min(
            tl.where((counts > 0) & (mass_above + tl.cumsum(mass, 0) >= target), lane, WINDOW))
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
    logprob_ptr,  # [B] fp32: idem (plain draws: -max - log z, the token's scaled logit added here;
                  # 2nd-pass rows: 0 or NaN from _merge_kernel, added to their log-prob)
    V, stride, chunks,
    CHUNKS: tl.constexpr, CHUNK: tl.constexpr, WINDOW: tl.constexpr, FIXED: tl.constexpr,
    EMPTY: tl.constexpr, IS_FP32: tl.constexpr, IS_FP16: tl.constexpr,
):
    row = tl.program_id(0)
    inv_temp, top_k, top_p, greedy, cut, second = row_params(temp_ptr, top_k_ptr, top_p_ptr,
                                                             min_p_ptr, row, V)
    logits_row = logits_ptr + row.to(tl.int64) * stride
    if second:
        m = tl.load(row_ptr + row * 3)
        z_key = tl.load(row_ptr + row * 3 + 2)
        mode = tl.load(win_ptr + row * 4)
        key_lo = tl.load(win_ptr + row * 4 + 1)
        key_hi = tl.load(win_ptr + row * 4 + 2)
        log_min_p = row_log_min_p(min_p_ptr, row)
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
                                          tl.load(part_arg_ptr + here * 2 + 1, mask=live, other=0),
                                          2147483647))
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
                first = tl.min(
                    tl.where(
                        (counts > 0) & (keys >= cut_k)
                        & (mass_above + tl.cumsum(mass, 0) >= target),
                        lane, WINDOW))
                # held: the mass above the window is short of the target (or nothing is above), and
                # the target is reached in the window (or top-k's cut, in it, comes first)
                ok = ok & ((count_above == 0) | (mass_above < target)) & (
                    (first < WINDOW) | (top_k < V))
                cut_key = tl.where(first < WINDOW, key_hi - first, cut_k)
            take = inside & (keys >= cut_key)
            w_score, w_token = unpack_score(
                tl.max(tl.load(best_ptr + bins, mask=take, other=EMPTY)))
            better = (w_score > best_above) | ((w_score == best_above) & (w_token < token_above))
            token = tl.where(better, w_token, token_above)
            if IS_FP32:
                z_window = tl.sum(tl.load(fixed_ptr + bins, mask=take, other=0)).to(tl.float32) * (
                    1.0 / FIXED)
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
        token = tl.minimum(tl.maximum(token, 0), V - 1)  # NaN logits: see _merge_kernel
        s_token = tl.load(logits_row + token).to(tl.float32) * inv_temp
        tl.store(token_ptr + row, token.to(tl.int64))
        tl.store(logprob_ptr + row, s_token - m - tl.log(z) + tl.load(logprob_ptr + row))
    elif greedy == 0:
        token = tl.load(token_ptr + row)
        s_token = tl.load(logits_row + token).to(tl.float32) * inv_temp
        tl.store(logprob_ptr + row, tl.load(logprob_ptr + row) + s_token)
