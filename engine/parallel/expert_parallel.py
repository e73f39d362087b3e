"""Expert parallelism: the experts of every MoE block sharded across the ranks of a process group,
tokens sent to the rank that holds their expert and back with `all_to_all_single`.

`shard_experts(model, group)` keeps rank r's experts [r E / W, (r + 1) E / W) in each block (the
rest of the model is left to data parallelism). A sharded block's forward then sorts its slots by
expert as one process does, sends each rank the rows of its experts, runs its local experts as two
grouped GEMMs over the rows received from every rank, and sends the outputs back, where the weighted
unpermute sums them. Both exchanges are torch.distributed.nn's differentiable all_to_all_single, so
the backward sends the gradients the other way: a rank's expert gradients sum every rank's tokens
routed to them.

The exchange's sizes, two ways:
- variable splits (the default, exact): the per-expert row counts are exchanged first and read on
  the host for the split sizes, one host read per sparse layer (and per recomputed layer). It
  cannot be one a forward: a layer's routing reads the previous layer's output.
- fixed capacity (`capacity_factor` > 0, train.expert_capacity_factor): every rank sends every
  rank of the group a buffer of C = min(ceil(factor x tokens x top_k / W), tokens x top_k) rows,
  tokens the largest forward in the group, agreed once a forward (Capacity.agree: the forward's one
  host read, none per layer). A buffer holds a rank's rows for the receiver's experts in the sorted
  order (by expert, then token); the rows past C are dropped: their expert outputs count as zero
  (GShard / Switch; the token keeps its residual and its other experts), their number kept per
  layer as block.dropped. Padding rows are zeros, run by the last local expert (static shapes) and
  ignored. At factor >= W nothing can be dropped and the result is the variable splits'.

Training (`train.expert_parallel=E`, `shard_for_training`): the ranks form expert groups of E
consecutive ranks (ParallelDims.mesh: replica x expert); the experts are sharded E ways
within a group and the world / E groups hold replicas of the same shards, as DTensors
(Replicate(), Shard(0)), so the sharded load reads only a rank's experts, the checkpoints store
each shard once with its offsets, the export gathers them (distributed.whole_value) and the
clip's norm sums them over an expert group (fused_adamw). FSDP shards the rest over every rank and
leaves the experts alone (ignored_params). Tokens go to the experts of their own group only. The
experts' gradients are divided by E in the backward and averaged over the replicas before the step
(distributed.average_replicated_gradients, one flat all-reduce), so they are the world's mean as
FSDP's own: every stage backpropagates loss * world_size (distributed.py).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from ... import kernels
from ..model.moe import SparseMoeBlock, moe_blocks
from . import distributed


@dataclass(eq=False)
class Capacity:
    """The fixed-capacity exchange of a model's expert-parallel blocks (one object they share):
    `rows` per (source, destination) buffer of the forward running now (module docstring)."""

    factor: float
    group: object
    world: int
    top_k: int
    rows: int = 0

    def agree(self, tokens: int, device) -> None:
        """Size this forward's buffers from the group's largest forward of `tokens` rows."""
        most = torch.tensor([tokens], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.group)
        most = int(most.item())  # the forward's one host read; its layers read none
        self.rows = min(math.ceil(self.factor * most * self.top_k / self.world), most * self.top_k)


@dataclass(frozen=True)
class ExpertShard:
    """This rank's share of a block's experts: `local` experts from `first`, of `world` ranks."""

    group: object
    world: int
    first: int
    local: int
    average: bool = False  # divide the experts' gradients by `world` (shard_for_training)
    capacity: Capacity | None = None  # None: variable splits

    def dispatch(self, block: SparseMoeBlock, h, ids, weights, prims) -> torch.Tensor:
        """The block's forward over the group (what SparseMoeBlock calls once sharded)."""
        return dispatch(block, h, ids, weights, prims)


def shard_experts(model: nn.Module, group=None, mesh=None, capacity_factor: float = 0.0) -> None:
    """Keep only this rank's experts in every MoE block of `model` (built whole, same weights on
    every rank, or on the meta device); the blocks then dispatch their tokens over `group` (default:
    the world). mesh: ParallelDims.mesh at train.expert_parallel > 1 (replica x expert) instead
    of `group`: the blocks
    dispatch over its expert dimension and the experts are DTensors (Replicate(), Shard(0): expert
    rows), their gradients divided by the expert group's size (see the module docstring).
    capacity_factor > 0: fixed-capacity buffers of that factor (module docstring)."""
    group = mesh.get_group("expert") if mesh is not None else group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    blocks = moe_blocks(model)
    capacity = (Capacity(capacity_factor, group, world, blocks[0].moe.top_k)
                if capacity_factor > 0 and blocks else None)
    for block in blocks:
        n = block.moe.num_experts
        if n % world:
            raise ValueError(
                f"expert parallelism over {world} ranks needs num_experts divisible by it, got {n}")
        local = n // world
        shard = ExpertShard(group, world, rank * local, local, mesh is not None, capacity)
        for name in ("gate_up_proj", "down_proj"):
            whole = getattr(block.experts, name)
            mine = whole.detach()[shard.first:shard.first + local].clone()
            if mesh is not None:
                from torch.distributed.tensor import DTensor, Replicate, Shard
                mine = DTensor.from_local(mine, mesh, [Replicate(), Shard(0)], run_check=False,
                                          shape=whole.shape, stride=whole.stride())
            setattr(block.experts, name, nn.Parameter(mine, requires_grad=whole.requires_grad))
        block.expert_shard = shard


def shard_for_training(model: nn.Module, dims) -> nn.Module:
    """train.expert_parallel = dims.expert (dividing the world size): `model` (on the meta device,
    hf_io.load_model's `shard`) with its experts sharded over expert groups of that many ranks
    (replicated across the groups: dims.mesh()'s (expert_replica, expert)) and the rest sharded by
    FSDP2 over every rank around them (dims.sub("data"))."""
    shard_experts(model, mesh=dims.mesh(), capacity_factor=dims.expert_capacity_factor)
    experts = [block.experts for block in moe_blocks(model)]
    return distributed.shard(model, "shard", dims.device_type, keep=experts, mesh=dims.sub("data"))


@contextlib.contextmanager
def experts_run_locally(model: nn.Module) -> Iterator[list[SparseMoeBlock]]:
    """Inside: every expert-parallel block of `model` in the training layout (shard_for_training:
    DTensor experts) runs its experts locally, dispatching nothing, from whatever whole expert
    weights the caller puts in it (gathered_experts; the persistent buffers of
    parallel/persistent_weights.py). Yields those blocks; no-op (none) without that layout."""
    blocks = [b for b in moe_blocks(model) if b.expert_shard is not None and b.expert_shard.average]
    shards = [b.expert_shard for b in blocks]
    for block in blocks:
        block.expert_shard = None
    try:
        yield blocks
    finally:
        for block, shard in zip(blocks, shards):
            block.expert_shard = shard


@contextlib.contextmanager
def gathered_experts(model: nn.Module) -> Iterator[None]:
    """Inside: every expert-parallel block of `model` holds all its experts whole (gathered from the
    ranks: collective on entry) and runs them locally, as distributed.gathered does for FSDP's
    units, so a rank generates its own prompts with no collective. Outside again: its own experts,
    trained in place (the gathered copies are dropped). For the training layout (shard_for_training:
    DTensor experts); no-op without it."""
    with experts_run_locally(model) as blocks:
        kept = [(b.experts.gate_up_proj, b.experts.down_proj) for b in blocks]
        with torch.no_grad():
            for block, mine in zip(blocks, kept):
                for name, weight in zip(("gate_up_proj", "down_proj"), mine):
                    setattr(block.experts, name,
                            nn.Parameter(weight.full_tensor(), requires_grad=False))
        try:
            yield
        finally:
            for block, (gate_up, down) in zip(blocks, kept):
                block.experts.gate_up_proj, block.experts.down_proj = gate_up, down


def dispatch(block: SparseMoeBlock, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
             prims) -> torch.Tensor:
    """The expert-parallel forward of `block`: h [T, H], its routing ids / weights [T, k] -> [T,
    H]."""
    shard, k = block.expert_shard, block.moe.top_k
    order, slot_rows, offsets = kernels.moe_sort(ids, block.moe.num_experts)
    # [T*k, H], by global expert: each rank's experts contiguous
    rows = kernels.moe_permute(h, order, k)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))  # [E] rows per expert
    # [W * local]: for my experts, from each rank in turn
    received_counts = torch.empty_like(counts)
    dist.all_to_all_single(received_counts, counts, group=shard.group)
    per_rank = torch.stack([counts, received_counts]).view(2, shard.world, shard.local)
    exchange = (_Fixed(shard, per_rank, offsets, rows.shape[0]) if shard.capacity is not None
                else _Variable(shard, per_rank))
    block.dropped = exchange.dropped
    # [R, H] by source rank, then expert; each row's local expert (local: padding)
    received, expert_of_row, by_expert = exchange.send(rows)
    regroup = torch.argsort(expert_of_row, stable=True)
    local_offsets = by_expert.cumsum(0).to(torch.int32)
    local_offsets[-1] = received.shape[0]  # a fixed buffer's padding rows join the last group
    x = received.index_select(0, regroup)
    gate_up = kernels.grouped_linear(x, _local(block.experts.gate_up_proj, shard), local_offsets)
    out = kernels.grouped_linear(prims.silu_mul(gate_up), _local(block.experts.down_proj, shard),
                                 local_offsets)
    restored = torch.empty_like(regroup).scatter_(0, regroup,
                                                  torch.arange(regroup.numel(), device=h.device))
    returned = exchange.back(out.index_select(0, restored))  # [T*k, H] by global expert
    return kernels.moe_unpermute(returned, order, slot_rows, weights)


class _Variable:
    """The exact exchange: each rank's rows sent whole, the split sizes read on the host."""

    def __init__(self, shard: ExpertShard, per_rank: torch.Tensor):
        # per_rank [2, W, local]: rows I send to each rank's experts, rows each rank sends mine.
        # The split sizes: the one host read of the layer (it routes on the previous one's output)
        self.shard, self.by_rank, self.dropped = shard, per_rank[1], None
        self.sizes = per_rank.sum(-1).tolist()

    def send(self, rows):
        """rows [T*k, H] -> (received [R, H], local expert of each row [R], rows per expert [L])."""
        shard, (send, receive) = self.shard, self.sizes
        received = _exchange(rows, receive, send, shard.group)
        expert_of_row = torch.arange(shard.local, device=rows.device).repeat(
            shard.world).repeat_interleave(self.by_rank.reshape(-1), output_size=sum(receive))
        return received, expert_of_row, self.by_rank.sum(0)

    def back(self, out):
        """out [R, H] as received -> [T*k, H] as sent."""
        send, receive = self.sizes
        return _exchange(out, send, receive, self.shard.group)


class _Fixed:
    """The fixed-capacity exchange: C = shard.capacity.rows rows to and from each rank, no host
    read; a buffer's rows past C dropped (module docstring)."""

    def __init__(self, shard: ExpertShard, per_rank: torch.Tensor, offsets: torch.Tensor,
                 total: int):
        # per_rank [2, W, L]: my rows for each rank's experts, each rank's rows for my experts;
        # offsets [E]: the end of each expert's sorted rows, of `total` (T*k)
        self.shard, c = shard, shard.capacity.rows
        if c < 1:
            raise ValueError("a fixed-capacity expert-parallel block ran outside a forward that "
                             "agreed on its buffers: expected CausalLM.hidden_states")
        sent = per_rank[0].sum(-1)  # [W]
        starts = sent.cumsum(0) - sent  # each rank's first sorted row
        place = torch.arange(c, device=offsets.device)
        # buffer row (rank r, place p) <- sorted row starts[r] + p while p < sent[r], else zeros
        self.filled = (place < sent.unsqueeze(1)).view(-1, 1)  # [W*C, 1]
        self.source = (starts.unsqueeze(1) + place).view(-1).clamp(max=total - 1)
        # sorted row i (of rank r, at place i - starts[r]) back from buffer row r*C + place if kept
        row = torch.arange(total, device=offsets.device)
        rank = torch.searchsorted(offsets, row.to(offsets.dtype), right=True) // shard.local
        at = row - starts.index_select(0, rank)
        self.kept = (at < c).view(-1, 1)  # [T*k, 1]
        self.slot = rank * c + at.clamp(max=c - 1)
        # my experts' kept rows from each rank, cumulated over my experts: [W, L]
        self.kept_ends = per_rank[1].cumsum(-1).clamp(max=c)
        self.dropped = (sent - c).clamp(min=0).sum()

    def send(self, rows):
        """rows [T*k, H] -> (received [W*C, H], local expert of each row [W*C] (L: padding), rows
        per local expert [L])."""
        world, c = self.shard.world, self.shard.capacity.rows
        buffers = torch.where(self.filled, rows.index_select(0, self.source), 0)
        received = dist_nn.all_to_all_single(torch.empty_like(buffers), buffers,
                                             group=self.shard.group)
        place = torch.arange(c, device=rows.device).expand(world, c).contiguous()
        expert_of_row = torch.searchsorted(self.kept_ends, place, right=True).view(-1)
        by_expert = torch.diff(self.kept_ends, prepend=self.kept_ends.new_zeros(world, 1))
        return received, expert_of_row, by_expert.sum(0)

    def back(self, out):
        """out [W*C, H] as received -> [T*k, H] as sent, a dropped row's output zero."""
        returned = dist_nn.all_to_all_single(torch.empty_like(out), out, group=self.shard.group)
        return torch.where(self.kept, returned.index_select(0, self.slot), 0)


def _exchange(rows: torch.Tensor, receive: list[int], send: list[int], group) -> torch.Tensor:
    """rows [sum(send), H] -> [sum(receive), H]: send[j] rows to rank j, receive[j] from it."""
    out = rows.new_empty(sum(receive), rows.shape[1])
    return dist_nn.all_to_all_single(out, rows.contiguous(), receive, send, group=group)


def _local(weight: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    """This rank's experts of `weight` (a DTensor's local shard), its gradient divided by the expert
    group's size when the shard averages (the stages' loss * world_size convention; the replicas'
    mean comes at the step)."""
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return _Averaged.apply(local, shard.world) if shard.average else local


class _Averaged(torch.autograd.Function):
    """x as is; its gradient divided by n."""

    @staticmethod
    def forward(ctx, x, n):
        ctx.n = n
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.n, None
