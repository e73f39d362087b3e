"""The fused sampler: one Triton program per row draws the token and its log-prob from the logits.

Same semantics as the torch reference `sampler.sample_torch` (its oracle): temperature, top-k, top-p,
the counter-based Gumbel noise of `sampler.gumbel_noise` recomputed in registers, greedy rows.
No [B, V] temporary is written and nothing is sorted:

- top-k keeps the values >= the k-th largest, found by bisection on the fp32 value's order-preserving
  int32 key (32 counting passes, exact);
- top-p keeps the values >= the largest key whose mass (of the top-k set) reaches p, found the same
  way with passes that sum the probability mass above the key;
- a last pass draws argmax(scaled logit + Gumbel) over the kept set and sums its mass for the log-prob.

Unfiltered rows read the logits twice (max, then draw); the bisection passes re-read a row that
stays in L2 on a GPU. Ties at the top-k/top-p boundary are all kept (the sort-based reference breaks
them by sort order): the only place the two can differ apart from rounding.
"""
from __future__ import annotations

import torch

from ...kernels.triton_compat import tl, triton

_BLOCK = 1024


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
def _order_key(x):
    """int32 key with the order of the fp32 values x (negative values' magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _scaled(logits_ptr, offs, V, inv_temp):
    return tl.load(logits_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp


@triton.jit
def _key_bisect(logits_ptr, V, inv_temp, floor_key, m, need, BY_MASS: tl.constexpr, BLOCK: tl.constexpr):
    """Largest int32 key t with (count, or exp-mass relative to max m) of {key >= t, key >= floor_key}
    at least `need`. 32 halvings of [floor_key, key(m)] in int64 (no overflow of the midpoint)."""
    lo = floor_key.to(tl.int64)  # invariant: measure(lo) >= need
    hi = _order_key(m).to(tl.int64) + 1  # invariant: measure(hi) < need (nothing above the max)
    for _ in range(32):
        mid = (lo + hi) // 2
        total = 0.0
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            s = _scaled(logits_ptr, offs, V, inv_temp)
            keep = (_order_key(s).to(tl.int64) >= mid) & (offs < V)
            if BY_MASS:
                total += tl.sum(tl.where(keep, tl.exp(s - m), 0.0))
            else:
                total += tl.sum(keep.to(tl.float32))
        ok = total >= need
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    return lo.to(tl.int32)


@triton.jit
def _sample_kernel(
    logits_ptr,  # [B, V] fp32/bf16/fp16, rows `stride` apart
    temp_ptr,  # [B] fp32, 0 = greedy
    top_k_ptr,  # [B] int64, 0 = off
    top_p_ptr,  # [B] fp32, 1 = off
    seed_ptr,  # [B] int64
    pos_ptr,  # [B] int64
    token_ptr,  # [B] int64 out
    logprob_ptr,  # [B] fp32 out
    V,
    stride,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    logits_ptr += row.to(tl.int64) * stride
    temp = tl.load(temp_ptr + row)
    greedy = temp == 0
    inv_temp = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, temp))
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)

    # Pass 1: row max (and its first index: the greedy token).
    m = float("-inf")
    best = 0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        s = _scaled(logits_ptr, offs, V, inv_temp)
        block_max = tl.max(s)
        block_arg = start + tl.argmax(s, 0)
        best = tl.where(block_max > m, block_arg, best)
        m = tl.maximum(m, block_max)

    # Filters (sampled rows only; greedy rows report the unfiltered model log-prob).
    floor_key = tl.full((), -2147483648, tl.int32)  # below every key: keep everything
    if (top_k > 0) & (top_k < V) & (temp != 0):
        floor_key = _key_bisect(logits_ptr, V, inv_temp, floor_key, m, top_k.to(tl.float32), False, BLOCK)
    if (top_p < 1) & (temp != 0):
        z_k = 0.0
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            s = _scaled(logits_ptr, offs, V, inv_temp)
            z_k += tl.sum(tl.where((_order_key(s) >= floor_key) & (offs < V), tl.exp(s - m), 0.0))
        floor_key = _key_bisect(logits_ptr, V, inv_temp, floor_key, m, top_p * z_k, True, BLOCK)

    # Last pass: Gumbel-max draw over the kept set, and its mass for the log-prob.
    seed = tl.load(seed_ptr + row)
    pos = tl.load(pos_ptr + row)
    row_hash = _mix32(_mix32(seed & 0xFFFFFFFF) ^ ((seed >> 32) & 0xFFFFFFFF))
    row_hash = _mix32(row_hash ^ (pos & 0xFFFFFFFF))
    z = 0.0
    draw_score = float("-inf")
    drawn = best
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        s = _scaled(logits_ptr, offs, V, inv_temp)
        kept = (_order_key(s) >= floor_key) & (offs < V)
        z += tl.sum(tl.where(kept, tl.exp(s - m), 0.0))
        bits = _mix32(_mix32(row_hash ^ offs.to(tl.int64)))
        uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        score = tl.where(kept, s + -tl.log(-tl.log(uniform)), float("-inf"))
        block_max = tl.max(score)
        block_arg = start + tl.argmax(score, 0)
        drawn = tl.where(block_max > draw_score, block_arg, drawn)
        draw_score = tl.maximum(draw_score, block_max)
    token = tl.where(greedy, best, drawn)
    s_token = tl.load(logits_ptr + token).to(tl.float32) * inv_temp
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(logprob_ptr + row, s_token - m - tl.log(z))


def sample_triton(logits, temperatures, top_ks, top_ps, seeds, positions):
    """The fused sampler; arguments and results as `sampler.sample_torch` (logits [B, V] fp32 or
    bf16/fp16, read in their own dtype and computed in fp32). Returns (tokens [B] int64, logprobs [B] fp32).
    A torch custom op (fusedrl::sample): one node to torch.compile, one op to a TorchDispatchMode."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    return torch.ops.fusedrl.sample(logits, temperatures.float().contiguous(), top_ks.contiguous(),
                                     top_ps.float().contiguous(), seeds.contiguous(), positions.contiguous())


@torch.library.custom_op("fusedrl::sample", mutates_args=())
def _sample_op(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
               seeds: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, vocab = logits.shape
    tokens, logprobs = _sample_fake(logits, temperatures, top_ks, top_ps, seeds, positions)
    if batch:
        _sample_kernel[(batch,)](logits, temperatures, top_ks, top_ps, seeds, positions, tokens, logprobs,
                                 vocab, logits.stride(0), BLOCK=_BLOCK)
    return tokens, logprobs


@_sample_op.register_fake
def _sample_fake(logits, temperatures, top_ks, top_ps, seeds, positions):
    batch = logits.shape[0]
    return (torch.empty(batch, dtype=torch.int64, device=logits.device),
            torch.empty(batch, dtype=torch.float32, device=logits.device))
