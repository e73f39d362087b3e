"""Sampling from fp32 logits: greedy, temperature, top-k, top-p, with per-request seeds.

Randomness is counter-based rather than drawn from a generator: the uniform for (request seed,
position, vocabulary id) is a hash of the three, turned into Gumbel noise, and the sampled token is
argmax(log p + Gumbel) (the Gumbel-max trick draws exactly from p). So a seeded request gets the same
tokens whatever else is in the batch, after a preemption and recompute, and on every run, with no
per-request generator objects, no Python loop over the batch and no host sync.
"""
from __future__ import annotations

import torch

from ...kernels import token_logprobs, use_backend
from ..model.attention import use_triton
from .sampler_kernels import sample_triton

_MASK32 = 0xFFFFFFFF


def sample(logits, temperatures, top_ks, top_ps, seeds, positions):
    """Draw one token per row: the fused Triton sampler where our kernels run (no host sync, no
    [B, V] temporaries; it reads bf16/fp16 logits as they are), else the torch reference on fp32
    logits. Arguments and results as `sample_torch`, logits in any float dtype."""
    if use_triton(logits):
        return sample_triton(logits, temperatures, top_ks, top_ps, seeds, positions)
    return sample_torch(logits.float(), temperatures, top_ks, top_ps, seeds, positions)


def sample_torch(logits, temperatures, top_ks, top_ps, seeds, positions):
    """Draw one token per row (the reference: sorts for top-k/top-p, host syncs to skip work).

    logits [B, V] fp32; temperatures [B] fp32 (0 = greedy); top_ks [B] int64 (0 = off);
    top_ps [B] fp32 (1 = off); seeds [B] int64; positions [B] int64 (index of the token being drawn).
    Returns (tokens [B] int64, logprobs [B] fp32): the log-prob of each token under the distribution
    it was drawn from (temperature-scaled, top-k/top-p renormalized). Greedy rows report the
    log-prob under the unmodified model distribution (their sampling distribution is a point mass).
    """
    greedy = temperatures == 0
    scaled = logits / torch.where(greedy, 1.0, temperatures)[:, None]
    if bool(((top_ks > 0) | (top_ps < 1)).any()):
        filtered = _top_k_top_p(scaled, top_ks, top_ps)
        scaled = torch.where(greedy[:, None], scaled, filtered)
    if bool(greedy.all()):
        tokens = logits.argmax(-1)
    else:
        noise = gumbel_noise(seeds, positions, logits.shape[1])  # [B, V]
        sampled = (torch.log_softmax(scaled, -1) + noise).argmax(-1)
        tokens = torch.where(greedy, logits.argmax(-1), sampled)
    return tokens, _token_logprobs(scaled, tokens)


def _token_logprobs(logits, tokens):
    """Fused log-softmax + gather on the GPU; on the CPU the plain PyTorch backend, since the
    Triton interpreter (on in CPU test runs) would cost more than the whole model step."""
    if logits.is_cuda:
        return token_logprobs(logits, tokens)
    with use_backend("torch"):
        return token_logprobs(logits, tokens)


def _top_k_top_p(logits, top_ks, top_ps):
    """Mask (to -inf) tokens outside each row's top-k, then outside the smallest set of the remaining
    tokens whose renormalized probability reaches top_p. Always keeps the most likely token."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(-1, descending=True)  # [B, V]
    ranks = torch.arange(vocab, device=logits.device)
    k = torch.where(top_ks > 0, top_ks.clamp(max=vocab), vocab)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
    # Rows with top_p == 1 are left alone: rounding can push the cumulative mass to 1 before the
    # last token and would cut their tail.
    cut = (mass_before >= top_ps[:, None]) & (top_ps[:, None] < 1)
    sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


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
