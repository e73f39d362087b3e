"""The plain PyTorch reference of the sampler, drawing from logits (greedy, temperature, top-k,
top-p, min-p, per-request seeds) with sorts and [B, V] temporaries: the oracle of the split-row
Triton sampler (kernels/sampling/sampler.py), its "torch" backend, and the statement of its rules.
Re-exported by the package as ``fusedrl.kernels.reference.sample``.

Randomness is counter-based rather than drawn from a generator: the uniform for (request seed,
position, vocabulary id) is a hash of the three, turned into Gumbel noise, and the sampled token is
argmax(scaled logit + Gumbel) over the kept tokens (the Gumbel-max trick draws exactly from their
softmax). So a seeded request gets the same tokens whatever else is in the batch, after a
preemption and recompute, and on every run, with no per-request generator objects, no Python loop
over the batch and no host sync.

The filters, in Hugging Face's order (temperature, top-k, top-p, min-p), all cut the row at a value:
- the order is that of the logit's 16-bit key (`order_key16`: the value itself for bf16/fp16
  logits; for fp32 logits its top 16 bits, a bf16 truncation), and every token whose key equals the
  cut's is kept (ties are kept together, never broken by position);
- top-k keeps the keys >= the k-th largest; top-p keeps each token whose strictly larger keys hold
  less than top_p of the top-k set's mass (so the most likely key always stays: top_p 0 keeps only
  it), a key's mass taken at its value (exact for bf16/fp16 logits);
- min-p keeps the tokens with probability >= min_p times the most likely one's.
The draw and the log-prob use the exact scaled logits of the kept tokens.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def sample(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps=None):
    """Draw one token per row.

    logits [B, V] fp32/bf16/fp16 (computed in fp32); temperatures [B] fp32 (0 = greedy); top_ks [B]
    int64 (0 = off); top_ps [B] fp32 (1 = off); seeds [B] int64; positions [B] int64 (index of the
    token being drawn); min_ps [B] fp32 (0 = off, the default).
    Returns (tokens [B] int64, logprobs [B] fp32): the log-prob of each token under the distribution
    it was drawn from (temperature-scaled, filtered, renormalized). Greedy rows take the first
    argmax and report the log-prob under the unmodified model distribution.
    """
    if min_ps is None:
        min_ps = torch.zeros_like(top_ps, dtype=torch.float32)
    greedy = temperatures == 0
    # the kernel's rounding: x * (1/T)
    inv_temp = 1.0 / torch.where(greedy, 1.0, temperatures.float())
    scaled = logits.float() * inv_temp[:, None]  # [B, V]
    kept = kept_mask(logits, scaled, inv_temp, top_ks, top_ps, min_ps) | greedy[:, None]
    noise = gumbel_noise(seeds, positions, logits.shape[1])  # [B, V]
    drawn = (scaled + noise).masked_fill(~kept, float("-inf")).argmax(-1)
    tokens = torch.where(greedy, logits.float().argmax(-1), drawn)
    logprobs = scaled.masked_fill(~kept, float("-inf")).log_softmax(-1).gather(1,
                                                                               tokens[:, None])[:,
                                                                                                0]
    return tokens, logprobs


def kept_mask(logits, scaled, inv_temp, top_ks, top_ps, min_ps):
    """[B, V] bool: the tokens each row's top-k, top-p and min-p keep (the module docstring's
    rules). logits in their own dtype (for the keys); scaled [B, V] fp32 = logits * inv_temp [B]."""
    vocab = logits.shape[1]
    keys = order_key16(logits)  # [B, V] int32
    m = scaled.max(-1, keepdim=True).values
    mass = torch.exp(key16_value(keys, logits.dtype) * inv_temp[:, None] - m)  # each key's mass
    sorted_keys, order = keys.sort(dim=-1, descending=True, stable=True)
    k = torch.where((top_ks > 0) & (top_ks < vocab), top_ks, vocab).clamp(min=1)
    kth = sorted_keys.gather(1, (k - 1)[:, None])  # [B, 1]
    in_top_k = keys >= kth
    sorted_mass = mass.gather(1, order).masked_fill(sorted_keys < kth, 0.0)
    mass_k = sorted_mass.sum(-1, keepdim=True)
    # mass of strictly larger keys: the exclusive cumulative sum at the first token of each key's
    # run
    before = sorted_mass.cumsum(-1) - sorted_mass
    first = torch.searchsorted(-sorted_keys, -sorted_keys, right=False)
    above = torch.empty_like(before).scatter_(1, order, before.gather(1, first))
    in_top_p = (above < top_ps[:, None] * mass_k) | (keys == sorted_keys[:, :1]) | (
        top_ps[:, None] >= 1)
    log_min_p = torch.where(min_ps > 0, torch.log(min_ps.float().clamp(min=1e-38)), float("-inf"))
    in_min_p = scaled - m >= log_min_p[:, None]
    return in_top_k & in_top_p & in_min_p


def order_key16(logits):
    """int32 [B, V] in [-32768, 32767] ordered as the logits: the 16-bit pattern of bf16/fp16 values
    (the top 16 bits of fp32 ones), negative values' magnitude bits flipped."""
    if logits.dtype == torch.float32:
        bits = logits.view(torch.int32) >> 16
    else:
        bits = logits.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFF, bits)


def key16_value(keys, dtype):
    """The fp32 value of each 16-bit key (inverse of order_key16; fp32 logits: their truncation)."""
    bits = torch.where(keys < 0, keys ^ 0x7FFF, keys)
    if dtype == torch.float16:
        return bits.to(torch.int16).view(torch.float16).float()
    return (bits << 16).view(torch.float32)


def gumbel_noise(seeds, positions, vocab_size: int):
    """Gumbel(0, 1) noise [B, V] that is a pure function of (seed, position, vocabulary id)."""
    row = _mix32(_mix32(seeds & _MASK32) ^ ((seeds >> 32) & _MASK32))
    row = _mix32(row ^ (positions & _MASK32))  # [B]
    ids = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _mix32(_mix32(row[:, None] ^ ids[None, :]))  # [B, V] 32 random bits
    # The top 24 bits, centred in their bucket: uniform in (0, 1) exactly representable in fp32.
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(uniform))


def _mix32(x):
    """lowbias32 (C. Wellons): a bijective 32-bit integer hash with full avalanche, on int64 tensors
    holding values in [0, 2^32). Products wrap in int64; the mask keeps their exact low 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)
