"""The split-row sampler: each row's vocabulary is cut into CHUNK-sized pieces, one Triton program
each, and merged; no sort, no serial search, the logits read at most twice.

Same semantics as the torch reference `sampler.sample_torch` (its oracle; the rules are in
sampler.py's docstring). Five launches, whatever the batch (a row's chunks run in parallel, so one
row alone spreads over vocab / CHUNK programs):

1. `_chunk_stats_kernel` [rows, chunks] reads the logits once: each chunk's max, sum of exp, first
   argmax, and (rows that draw without a cut) its best Gumbel score. Rows with top-k or top-p add
   their tokens to a per-row histogram of the 16-bit order key (65536 int32 counts, zeroed first),
   skipping the tokens no cut can keep: below a chunk-local top-k bound (a 4096-bin count of the
   chunk's keys), or (top-p alone) more than ln(V / (1 - top_p)) below the chunk's max;
2. `_cut_kernel` [rows] merges the chunks (max, sum, greedy token, plain draw: those rows are done)
   and, for rows with a cut, walks the histogram down from the max key, 1024 bins a step, to the
   top-k key (counts) and then the top-p key (each key's count times its mass): one cut key per row;
3. `_cut_draw_kernel` [rows, chunks] reads the logits of the rows with a cut (or min-p) again: the
   best Gumbel score and the mass of the kept tokens per chunk;
4. `_finish_kernel` [rows] merges those into the token and its log-prob.
"""
from __future__ import annotations

import math

import torch

from .online_softmax import lanes_of, lanes_reduce, safe_shift
from .triton_compat import tl, triton

CHUNK = 4096  # tokens per program; fixed (not chosen by batch), so a row's numbers never depend on it
KEYS = 65536  # 16-bit order keys: the histogram's bins
_COARSE = 4096  # bins of a chunk's top-k bound (the key's top 12 bits)
_SCAN = 1024  # histogram bins per step of the cut walk


@triton.jit
def _key16(x, IS_FP32: tl.constexpr):
    """int32 order key in [-32768, 32767] (sampler.order_key16)."""
    if IS_FP32:
        bits = x.to(tl.int32, bitcast=True) >> 16
    else:
        bits = x.to(tl.int16, bitcast=True).to(tl.int32)
    return tl.where(bits < 0, bits ^ 0x7FFF, bits)


@triton.jit
def _key16_value(key, IS_FP16: tl.constexpr):
    """fp32 value of an order key (sampler.key16_value)."""
    bits = tl.where(key < 0, key ^ 0x7FFF, key)
    if IS_FP16:
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return (bits << 16).to(tl.float32, bitcast=True)


@triton.jit
def _mix32(x):
    """sampler._mix32 op for op, on int64 holding [0, 2^32): products wrap, the mask keeps their low
    32 bits (uint32 arithmetic would promote the constants above 2^31 to int64 and not wrap)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _gumbel(seed_ptr, pos_ptr, row, offs):
    """sampler.gumbel_noise for one row's `offs`."""
    seed = tl.load(seed_ptr + row)
    pos = tl.load(pos_ptr + row)
    row_hash = _mix32(_mix32(seed & 0xFFFFFFFF) ^ ((seed >> 32) & 0xFFFFFFFF))
    row_hash = _mix32(row_hash ^ (pos & 0xFFFFFFFF))
    bits = _mix32(_mix32(row_hash ^ offs.to(tl.int64)))
    uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(-tl.log(uniform))


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
def _chunk_stats_kernel(
    logits_ptr,  # [B, V] fp32/bf16/fp16, rows `stride` apart
    temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, pos_ptr,  # [B] sampling parameters
    stat_ptr,  # [B, C, 4] fp32 out: max, sum exp(s - max), sum exp(key value - max), best Gumbel score
    arg_ptr,  # [B, C, 3] int32 out: first argmax, max key, index of the best Gumbel score
    hist_ptr,  # [B, KEYS] int32, zeroed: key counts (rows with a cut)
    V, stride, log_v,
    CHUNK: tl.constexpr, COARSE: tl.constexpr, KEYS: tl.constexpr,
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
    # The chunk's partial log-softmax state (max, sum exp), merged per row by _cut_kernel.
    s_lanes, sum_lanes, t_lanes = lanes_of(s)
    s_max, s_sum, _ = lanes_reduce(s_lanes, sum_lanes, t_lanes, False)
    key = tl.where(valid, _key16(x, IS_FP32), -32768)
    s_key = _key16_value(key, IS_FP16) * inv_temp  # == s for bf16/fp16 logits
    shift = safe_shift(s_max)  # a row of -inf: sums 0, not NaN
    out = (row * chunks + chunk).to(tl.int64)
    tl.store(stat_ptr + out * 4, s_max)
    tl.store(stat_ptr + out * 4 + 1, s_sum)
    tl.store(stat_ptr + out * 4 + 2, tl.sum(tl.where(valid, tl.exp(s_key - shift), 0.0)))
    tl.store(arg_ptr + out * 3, chunk * CHUNK + tl.argmax(s, 0))
    tl.store(arg_ptr + out * 3 + 1, tl.max(key))
    if (greedy == 0) & (second == 0):  # a plain draw: argmax(s + Gumbel) over the whole row
        score = tl.where(valid, s + _gumbel(seed_ptr, pos_ptr, row, offs), float("-inf"))
        tl.store(stat_ptr + out * 4 + 3, tl.max(score))
        tl.store(arg_ptr + out * 3 + 2, chunk * CHUNK + tl.argmax(score, 0))
    if cut:
        # Tokens no cut can keep stay out of the histogram (fewer atomics). Top-k: below the coarse
        # bin where this chunk alone already holds k tokens (>= k larger keys elsewhere too).
        coarse = (key + 32768) >> 4
        counts = tl.histogram(coarse, COARSE)
        above = tl.cumsum(counts, 0, reverse=True)
        floor = tl.max(tl.where(above >= top_k, tl.arange(0, COARSE), 0))
        take = valid & (coarse >= floor)
        if top_k >= V:
            # Top-p alone: a token with mass < (1 - p) / V of this chunk's max has more than p of
            # the row's mass above it (V tokens at most below); margin 1 against rounding.
            take = take & (s_key >= tl.max(s_key) - (log_v - tl.log(1.0 - top_p) + 1.0))
        tl.atomic_add(hist_ptr + row.to(tl.int64) * KEYS + key + 32768, 1, mask=take)


@triton.jit
def _bin_mass(counts, bins, inv_temp, m, IS_FP16: tl.constexpr):
    """Mass of histogram bins: count * exp(key value / temperature - max)."""
    value = _key16_value(bins - 32768, IS_FP16) * inv_temp
    return tl.where(counts > 0, counts * tl.exp(value - m), 0.0)


@triton.jit
def _cut_kernel(
    stat_ptr, arg_ptr, hist_ptr,  # as written by _chunk_stats_kernel
    temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr,  # [B] sampling parameters
    row_ptr,  # [B, 2] fp32 out: the row's max (scaled), and its cut key (as fp32; rows with a 2nd pass)
    token_ptr,  # [B] int64 out (rows without a 2nd pass)
    logprob_ptr,  # [B] fp32 out (rows without a 2nd pass)
    V, chunks,
    CHUNKS: tl.constexpr, SCAN: tl.constexpr, KEYS: tl.constexpr, IS_FP16: tl.constexpr,
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
    top_key = tl.max(tl.load(arg_ptr + here * 3 + 1, mask=live, other=-32768))
    greedy_token = tl.min(tl.where(c_max == m, tl.load(arg_ptr + here * 3, mask=live, other=0), 2147483647))
    c_score = tl.load(stat_ptr + here * 4 + 3, mask=live, other=float("-inf"))  # plain draws only
    drawn = tl.min(tl.where(c_score == tl.max(c_score), tl.load(arg_ptr + here * 3 + 2, mask=live, other=0),
                            2147483647))
    tl.store(row_ptr + row * 2, m)
    if greedy:
        tl.store(token_ptr + row, greedy_token.to(tl.int64))
        tl.store(logprob_ptr + row, -tl.log(z))  # the max's own log-prob: 0 - log sum exp(s - max)
    if (greedy == 0) & (second == 0):  # a plain draw: done but for the token's scaled logit, added by _finish
        tl.store(token_ptr + row, drawn.to(tl.int64))
        tl.store(logprob_ptr + row, -m - tl.log(z))
    cut_key = tl.full((), -32768, tl.int32)
    if cut:
        lane = tl.arange(0, SCAN)
        hist_row = hist_ptr + row.to(tl.int64) * KEYS
        # Top-k: the highest key whose count from the top reaches k (no cut: the lowest key).
        found = top_k >= V
        top = top_key + 32768
        count_above = tl.zeros((), tl.int32)
        mass_above = tl.zeros((), tl.float32)
        z_k = z_key
        while (found == 0) & (top >= 0):
            bins = top - lane
            counts = tl.load(hist_row + bins, mask=bins >= 0, other=0)
            mass = _bin_mass(counts, bins, inv_temp, m, IS_FP16)
            first = tl.min(tl.where(count_above + tl.cumsum(counts, 0) >= top_k, lane, SCAN))
            hit = first < SCAN
            cut_key = tl.where(hit, top - first - 32768, cut_key)
            z_k = tl.where(hit, mass_above + tl.sum(tl.where(lane <= first, mass, 0.0)), z_k)
            found = found | hit
            count_above += tl.sum(counts)
            mass_above += tl.sum(mass)
            top -= SCAN
        # Top-p: the highest key (of the top-k set) whose mass from the top reaches top_p of z_k.
        target = top_p * z_k
        found = top_p >= 1
        top = top_key + 32768
        mass_above = tl.zeros((), tl.float32)
        while (found == 0) & (top >= cut_key + 32768):
            bins = top - lane
            counts = tl.load(hist_row + bins, mask=bins >= cut_key + 32768, other=0)
            mass = _bin_mass(counts, bins, inv_temp, m, IS_FP16)
            first = tl.min(tl.where((counts > 0) & (mass_above + tl.cumsum(mass, 0) >= target), lane, SCAN))
            hit = first < SCAN
            cut_key = tl.where(hit, top - first - 32768, cut_key)
            found = found | hit
            mass_above += tl.sum(mass)
            top -= SCAN
    tl.store(row_ptr + row * 2 + 1, cut_key.to(tl.float32))


@triton.jit
def _cut_draw_kernel(
    logits_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, pos_ptr,
    row_ptr,  # [B, 2] fp32: max, cut key
    stat_ptr,  # [B, C, 4] fp32 out: slot 1 = kept mass, slot 3 = best Gumbel score of the kept tokens
    arg_ptr,  # [B, C, 3] int32 out: slot 2 = its index
    V, stride,
    CHUNK: tl.constexpr, IS_FP32: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    inv_temp, top_k, top_p, greedy, cut, second = _row_params(temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, row, V)
    if second:
        m = tl.load(row_ptr + row * 2)
        cut_key = tl.load(row_ptr + row * 2 + 1).to(tl.int32)
        min_p = tl.load(min_p_ptr + row)
        log_min_p = tl.where(min_p > 0, tl.log(tl.maximum(min_p, 1e-38)), float("-inf"))
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        valid = offs < V
        x = tl.load(logits_ptr + row.to(tl.int64) * stride + offs, mask=valid, other=float("-inf"))
        s = x.to(tl.float32) * inv_temp
        kept = valid & (_key16(x, IS_FP32) >= cut_key) & (s - m >= log_min_p)
        score = tl.where(kept, s + _gumbel(seed_ptr, pos_ptr, row, offs), float("-inf"))
        out = (row * tl.num_programs(1) + chunk).to(tl.int64)
        tl.store(stat_ptr + out * 4 + 1, tl.sum(tl.where(kept, tl.exp(s - m), 0.0)))
        tl.store(stat_ptr + out * 4 + 3, tl.max(score))
        tl.store(arg_ptr + out * 3 + 2, chunk * CHUNK + tl.argmax(score, 0))


@triton.jit
def _finish_kernel(
    logits_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, row_ptr, stat_ptr, arg_ptr,
    token_ptr,  # [B] int64: written here for rows with a 2nd pass, read for the plain draws
    logprob_ptr,  # [B] fp32: idem (plain draws: -max - log z, the token's scaled logit added here)
    V, stride, chunks,
    CHUNKS: tl.constexpr,
):
    row = tl.program_id(0)
    inv_temp, top_k, top_p, greedy, cut, second = _row_params(temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, row, V)
    if second:
        c = tl.arange(0, CHUNKS)
        here = (row * chunks + c).to(tl.int64)
        live = c < chunks
        score = tl.load(stat_ptr + here * 4 + 3, mask=live, other=float("-inf"))
        best = tl.max(score)
        token = tl.min(tl.where(score == best, tl.load(arg_ptr + here * 3 + 2, mask=live, other=0), 2147483647))
        z = tl.sum(tl.load(stat_ptr + here * 4 + 1, mask=live, other=0.0))
        m = tl.load(row_ptr + row * 2)
        s_token = tl.load(logits_ptr + row.to(tl.int64) * stride + token).to(tl.float32) * inv_temp
        tl.store(token_ptr + row, token.to(tl.int64))
        tl.store(logprob_ptr + row, s_token - m - tl.log(z))
    elif greedy == 0:
        token = tl.load(token_ptr + row)
        s_token = tl.load(logits_ptr + row.to(tl.int64) * stride + token).to(tl.float32) * inv_temp
        tl.store(logprob_ptr + row, tl.load(logprob_ptr + row) + s_token)


def sample_triton(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps):
    """The split-row sampler; arguments and results as `sampler.sample_torch` (logits [B, V] fp32 or
    bf16/fp16, read in their own dtype and computed in fp32). Returns (tokens [B] int64, logprobs [B]
    fp32). A torch custom op (fusedrl::sample): one node to torch.compile, one op to a TorchDispatchMode."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    return torch.ops.fusedrl.sample(logits, temperatures.float().contiguous(), top_ks.contiguous(),
                                     top_ps.float().contiguous(), seeds.contiguous(), positions.contiguous(),
                                     min_ps.float().contiguous())


@torch.library.custom_op("fusedrl::sample", mutates_args=())
def _sample_op(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
               seeds: torch.Tensor, positions: torch.Tensor, min_ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, vocab = logits.shape
    tokens, logprobs = _sample_fake(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps)
    if batch == 0:
        return tokens, logprobs
    block = min(CHUNK, triton.next_power_of_2(vocab))  # a function of the vocabulary only
    chunks = triton.cdiv(vocab, block)
    params = (temperatures, top_ks, top_ps, min_ps)
    stats = torch.empty(batch, chunks, 4, dtype=torch.float32, device=logits.device)
    args = torch.empty(batch, chunks, 3, dtype=torch.int32, device=logits.device)
    rows = torch.empty(batch, 2, dtype=torch.float32, device=logits.device)
    hist = torch.zeros(batch, KEYS, dtype=torch.int32, device=logits.device)
    dtypes = dict(IS_FP32=logits.dtype == torch.float32)
    _chunk_stats_kernel[(batch, chunks)](logits, *params, seeds, positions, stats, args, hist, vocab,
                                         logits.stride(0), math.log(vocab), CHUNK=block, COARSE=_COARSE,
                                         KEYS=KEYS, IS_FP16=logits.dtype == torch.float16, **dtypes)
    padded = triton.next_power_of_2(chunks)
    _cut_kernel[(batch,)](stats, args, hist, *params, rows, tokens, logprobs, vocab, chunks, CHUNKS=padded,
                          SCAN=_SCAN, KEYS=KEYS, IS_FP16=logits.dtype == torch.float16)
    _cut_draw_kernel[(batch, chunks)](logits, *params, seeds, positions, rows, stats, args, vocab,
                                      logits.stride(0), CHUNK=block, **dtypes)
    _finish_kernel[(batch,)](logits, *params, rows, stats, args, tokens, logprobs, vocab, logits.stride(0),
                             chunks, CHUNKS=padded)
    return tokens, logprobs


@_sample_op.register_fake
def _sample_fake(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps):
    batch = logits.shape[0]
    return (torch.empty(batch, dtype=torch.int64, device=logits.device),
            torch.empty(batch, dtype=torch.float32, device=logits.device))
