"""`BatchInvariant`: the batch-invariant mode as an object handed to whoever computes a token's
log-prob, the engine's runner (`LLM(..., batch_invariant=True)`) and the trainer's old-log-prob
forward (`rollout.exact=true`). No global flag: the two sides share the object, and with it the one
parameter both must agree on, the attention chunk (= the KV page size).

What it guarantees: the sampler's log-prob of a sampled token equals, bit for bit, the log-prob that
`head_logprobs(packed_hidden(...))` gives for the same token of the same sequence, whatever else is
in either batch (batch size and order, pack layout, prefix sharing between the n samples of a prompt,
preemption and recompute). Both sides run the same fixed-order ops (`ops`, `attention`, `decoder`) on
the same weights; see `ops` for why the order cannot depend on the batch. Top-k/top-p filter the
draw only: the log-prob reported is under softmax(logits / temperature), the distribution the
trainer's `old_logprobs` are taken under.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import AttentionMetadata, store_kv
from . import ops
from .attention import chunked_attention, packed_chunks, paged_chunks
from .decoder import decoder_hidden


@dataclass(frozen=True)
class BatchInvariant:
    """chunk_size: keys per attention chunk, the KV block size of the engine the tokens come from."""

    chunk_size: int

    def __post_init__(self):
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 1:
            raise ValueError(f"BatchInvariant.chunk_size={self.chunk_size!r} is invalid: expected an int >= 1 "
                             "(the KV block size)")

    def packed_hidden(self, model, input_ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        """The training forward: input_ids [N] holding sequences of `seqlens` back to back (positions
        restart at 0 in each) -> final hidden states [N, hidden] of `model` (a CausalLM)."""
        if sum(seqlens) != input_ids.shape[0] or min(seqlens, default=0) < 1:
            raise ValueError(f"seqlens={seqlens} must be positive and sum to {input_ids.shape[0]}")
        lens = torch.tensor(seqlens, device=input_ids.device)
        starts = torch.repeat_interleave(lens.cumsum(0) - lens, lens)  # [N] start of each token's sequence
        positions = torch.arange(input_ids.shape[0], device=input_ids.device) - starts
        return decoder_hidden(model, input_ids, positions,
                              self._packed_attend(positions, starts, max(seqlens)))

    def paged_hidden(self, model, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                     kv_caches: list, max_len: int) -> torch.Tensor:
        """A prefill or decode step against the paged cache: input_ids, positions [N], the runner's
        metadata, per-layer (k_cache, v_cache) whose block size is chunk_size, max_len the longest
        sequence (cached + new tokens) -> hidden [N, hidden]. New K/V are stored before attending."""
        block_size = kv_caches[0][0].shape[1]
        if block_size != self.chunk_size:
            raise ValueError(f"KV block size {block_size} != BatchInvariant.chunk_size {self.chunk_size}: "
                             "pages and attention chunks must align")
        if meta.block_tables is None:  # a prefill with nothing cached: the new tokens are whole sequences
            seqlens = torch.tensor(meta.seqlens_q, device=input_ids.device)
            starts = torch.repeat_interleave(meta.cu_seqlens_q[:-1].long(), seqlens)
            attend_fresh = self._packed_attend(positions, starts, max_len)
        elif meta.is_decode:
            row_seq = torch.arange(input_ids.shape[0], device=input_ids.device)
        else:
            row_seq = torch.repeat_interleave(torch.arange(len(meta.seqlens_q), device=input_ids.device),
                                              torch.tensor(meta.seqlens_q, device=input_ids.device))
        num_chunks = -(-max_len // self.chunk_size)

        def attend(layer, q, k, v):
            k_cache, v_cache = kv_caches[layer]
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            if meta.block_tables is None:
                return attend_fresh(layer, q, k, v)
            source = paged_chunks(k_cache, v_cache, meta.block_tables, row_seq)
            return chunked_attention(q, positions, source, num_chunks, self.chunk_size)
        return decoder_hidden(model, input_ids, positions, attend)

    def _packed_attend(self, positions, starts, max_len: int):
        num_chunks = -(-max_len // self.chunk_size)

        def attend(layer, q, k, v):
            return chunked_attention(q, positions, packed_chunks(k, v, starts, self.chunk_size), num_chunks,
                                     self.chunk_size)
        return attend

    @staticmethod
    def logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """hidden [M, H] @ LM head weight [V, H].T -> fp32 logits [M, V] (not rounded to the weight's dtype)."""
        return ops.linear(hidden, weight, out_dtype=torch.float32)

    @staticmethod
    def sampler_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
        """The sampler's log-probs: logits [B, V] fp32, tokens [B], temperatures [B] fp32 (0 = greedy,
        reported at temperature 1 as the default sampler does) -> fp32 [B]."""
        return ops.token_logprobs(logits, tokens, torch.where(temperatures > 0, temperatures, 1.0))

    def head_logprobs(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                      temperature: float, with_entropy: bool = False):
        """The trainer's log-probs: hidden [M, H] (rows predicting labels [M]), LM head weight [V, H]
        -> fp32 log-probs [M] under softmax(logits / temperature) (and the entropy [M] with_entropy)."""
        temperatures = torch.full(labels.shape, temperature, dtype=torch.float32, device=hidden.device)
        return ops.token_logprobs(self.logits(hidden, weight), labels, temperatures, with_entropy)
