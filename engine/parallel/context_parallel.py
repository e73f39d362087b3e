"""Context parallelism (train.context_parallel = C): every training and scoring forward's packed
tokens split over the C ranks of a context group, each rank running every layer on its own
contiguous 1/C of the pack.

Each rank holds the whole batch (the C ranks of a group take the same rows, as a tensor group's
ranks do) and forwards one shard of it: the pack padded with a segment of at most C - 1 tokens
to C equal shards, rank c taking tokens [c * L, (c + 1) * L). Every op but attention is per
token. Attention all-gathers the layer's rotated keys and values over the group (Llama 3's
context parallelism) and runs the one varlen path over them: the local queries of a sequence are
the bottom-right end of its keys up to the shard's end (`AttentionMetadata.key_rows`), so the
causal mask inside each sequence is the whole pack's, with RoPE at the tokens' global positions.
The gather's backward sums every rank's key/value gradients and keeps the local shard's.

Why the gather and not Ulysses' all-to-all over heads: it runs at any head count (Ulysses needs C
to divide the key/value heads, which GQA models make small: 2 for Qwen2.5-7B) and composes with
tensor slices (which divide the heads already); its cost is one layer's whole-pack keys and values
per rank, small beside the per-token activations it divides with GQA.

The log-probs of a shard's targets are gathered over the group (a float per target), so every rank
of the group computes the same whole loss and statistics from them; the gather's backward keeps
each rank's own part. The ranks' weight gradients are parts of one sum: the trainer sums them over
the group (FSDP2 over data x context, the loss scaled by C: engine/train/supervised.py,
engine/stages/ppo/update.py). Beside tensor parallelism each context rank is a tensor group: the
walk's tensor collectives run there on the rank's shard, the gathers here on its heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ...kernels.attention import AttentionMetadata, varlen_attention
from ..model.lm_head import lm_head_logprobs
from . import distributed


@dataclass(frozen=True)
class ContextParallel:
    """The context group of this rank: `size` ranks (C), this rank's index `rank` in it, `group` its
    process group; `data_group`: the process group of the ranks holding different rows (one of each
    block of C x `tensor` consecutive ranks: a context group of tensor groups,
    train.tensor_parallel)."""

    size: int
    rank: int
    group: object
    data_group: object = None
    tensor: int = 1

    def data_ranks(self) -> distributed.DataRanks:
        """The ranks holding different rows where C x T ranks are one data rank (PPO/GRPO)."""
        return distributed.DataRanks(self.size * self.tensor, self.data_group)

    def same_on_ranks(self, value):
        """The first context rank's `value` (picklable) on every rank of the group."""
        box = [value]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]


@dataclass
class ContextShard:
    """One rank's shard of a packed batch. input_ids, positions [L] (L = padded pack / C), meta: the
    attention of its queries over the gathered keys; target_rows [m] (local rows), target_ids [m];
    target_counts [C]: every rank's number of targets (the log-prob gather's sizes)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    target_rows: torch.Tensor
    target_ids: torch.Tensor
    target_counts: list[int]


def shard_pack(input_ids, seqlens: list[int], positions, target_rows, target_ids,
               cp: ContextParallel
               ) -> ContextShard:
    """This rank's ContextShard of a pack: input_ids, positions [N], seqlens [S] (sum N),
    target_rows [M] (increasing pack rows), target_ids [M]. The padding segment (its ids 0, its
    positions from 0) predicts nothing."""
    n, c = input_ids.shape[0], cp.size
    length = -(-n // c)
    pad = length * c - n
    device = input_ids.device
    if pad:
        seqlens = [*seqlens, pad]
        input_ids = torch.cat([input_ids, input_ids.new_zeros(pad)])
        positions = torch.cat([positions, torch.arange(pad, device=device, dtype=positions.dtype)])
    start, end = cp.rank * length, (cp.rank + 1) * length
    seqlens_q, seqlens_k, key_rows, seq_start = [], [], [], 0
    for seqlen in seqlens:  # the pieces of the sequences crossing [start, end)
        seq_end = seq_start + seqlen
        if seq_end > start and seq_start < end:
            last = min(seq_end, end)
            seqlens_q.append(last - max(seq_start, start))
            seqlens_k.append(last - seq_start)
            key_rows.append(torch.arange(seq_start, last))
        seq_start = seq_end
    cu_q, cu_k = (
        torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
        for lens in (seqlens_q, seqlens_k))
    meta = AttentionMetadata(seqlens_q=seqlens_q, seqlens_k=seqlens_k, cu_seqlens_q=cu_q,
                             cu_seqlens_k=cu_k, key_rows=torch.cat(key_rows).to(device))
    # Targets are in pack order: each rank's are one run of them (one host read of C + 1 bounds).
    bounds = torch.arange(c + 1, device=device) * length
    cuts = torch.searchsorted(target_rows, bounds).tolist()
    lo, hi = cuts[cp.rank], cuts[cp.rank + 1]
    return ContextShard(input_ids[start:end], positions[start:end], meta,
                        target_rows[lo:hi] - start, target_ids[lo:hi],
                        [b - a for a, b in zip(cuts, cuts[1:])])


class _GatherShards(torch.autograd.Function):
    """[L, ...] per rank -> [C * L, ...] in rank order; backward: the gradients of every rank
    summed, this rank's rows (each rank's attention reads every rank's keys)."""

    @staticmethod
    def forward(ctx, x, cp: ContextParallel):
        ctx.cp = cp
        parts = [torch.empty_like(x) for _ in range(cp.size)]
        dist.all_gather(parts, x.contiguous(), group=cp.group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # An all-reduce, not a reduce-scatter: gloo (the CPU ranks) has none.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.cp.group)
        return grad.chunk(ctx.cp.size)[ctx.cp.rank], None


class _GatherTargets(torch.autograd.Function):
    """[counts[rank]] per rank -> [sum counts] in rank order; backward: this rank's part (every rank
    computes the same loss of the whole, so its gradient is whole on every rank)."""

    @staticmethod
    def forward(ctx, x, counts: list[int], cp: ContextParallel):
        ctx.part = (sum(counts[:cp.rank]), counts[cp.rank])
        most = max(counts)
        padded = torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])])
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous(), group=cp.group)
        return torch.cat([part[:count] for part, count in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(0, *ctx.part), None, None


def gather_shards(x: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """x [L, ...] (this rank's shard) -> [C * L, ...], differentiable (_GatherShards)."""
    return _GatherShards.apply(x, cp)


def gather_targets(x: torch.Tensor, counts: list[int], cp: ContextParallel) -> torch.Tensor:
    """x [counts[rank], ...] (this rank's targets' values) -> [sum counts, ...], differentiable."""
    return _GatherTargets.apply(x, counts, cp)


def attend_over_context(meta: AttentionMetadata, cp: ContextParallel):
    """The decoder walk's attention of a shard (causal_lm.Attend): q [L, H, D] and k/v [L, Hkv, D]
    rotated at their global positions, k/v gathered over the group (one collective for both),
    -> [L, H, D]."""
    def attend(layer: int, q, k, v, angles):
        q, k = angles.rotate(q, k)
        keys, values = gather_shards(torch.stack((k, v), 1), cp).unbind(1)  # [C * L, Hkv, D] each
        return varlen_attention(q, keys, values, meta)
    return attend


def shard_hidden(model, packed, cp: ContextParallel
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """This rank's shard of a whole pack (a PackedBatch) through `model` (a CausalLM's trunk), the
    C ranks of `cp` each forwarding theirs -> (hidden [m, H]: the states that predict this rank's
    targets, target_ids [m], every rank's number of targets [C]: gather_targets' counts). A head
    on them gives this rank's part of the targets' values (log-probs, a critic's values)."""
    model.check_input_ids(packed.input_ids)
    shard = shard_pack(packed.input_ids, packed.seqlens, packed.positions, packed.target_rows,
                       packed.target_ids, cp)
    hidden = model.entry()(shard.input_ids, shard.positions,
                           attend=attend_over_context(shard.meta, cp))
    return hidden.index_select(0, shard.target_rows), shard.target_ids, shard.target_counts


def shard_logprobs(model, packed, cp: ContextParallel, temperature: float = 1.0,
                   with_entropy: bool = False, value_head=None):
    """The target log-probs of a whole pack (a PackedBatch) through this rank's shard of it, the C
    ranks of `cp` each forwarding theirs (model: a CausalLM) -> fp32 log-probs [M] of every target,
    and with_entropy (log-probs [M], entropy [M]), the same on every rank of the group; with
    `value_head` (a ScalarHead on the trunk: PPO's shared critic) its values [M] fp32 last, from
    the same forward."""
    hidden, target_ids, counts = shard_hidden(model, packed, cp)
    out = lm_head_logprobs(hidden, model.lm_head.weight, target_ids, temperature=temperature,
                           with_entropy=with_entropy)
    out = list(out) if with_entropy else [out]
    if value_head is not None:
        out.append(value_head(hidden).squeeze(-1).float())
    out = tuple(gather_targets(x, counts, cp) for x in out)
    return out if len(out) > 1 else out[0]


def shard_values(trunk, head, packed, cp: ContextParallel) -> torch.Tensor:
    """A critic's values [M] fp32 of every target of a whole pack: `head` (a ScalarHead) on
    `trunk`'s hidden states of this rank's shard (shard_hidden), gathered over the group: the same
    on every rank of it, differentiable as shard_logprobs is."""
    hidden, _, counts = shard_hidden(trunk, packed, cp)
    return gather_targets(head(hidden).squeeze(-1).float(), counts, cp)
