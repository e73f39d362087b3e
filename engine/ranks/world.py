"""Who this process is among the ranks of one `torchrun` job, and the collectives between ranks
that every layer uses: objects broadcast and gathered, numbers and tensors reduced over every rank
or over the data ranks (`DataRanks`). Without torchrun (no process group) every helper is the
identity of one process: world_size() == 1, rank() == 0, reductions return their input.

Reductions run where their tensors are: a CUDA tensor is reduced in place by NCCL (queued on the
stream like any kernel: no copy to the host, no host sync), a CPU tensor by gloo. The one host read
among them is `all_reduce_sum` of Python numbers (counts the host already holds).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """The ranks on this node (torchrun's LOCAL_WORLD_SIZE; the world size without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def is_main() -> bool:
    """Rank 0: the one process that writes logs, exports and checkpoint metadata."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast(value):
    """Rank 0's `value` (any picklable object) on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value) -> list:
    """[value of rank 0, value of rank 1, ...] (picklable objects) on every rank."""
    if world_size() == 1:
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


@dataclass(frozen=True)
class DataRanks:
    """The ranks that hold different rows, the ones the row helpers below (sums, gathers, row
    slices) reduce over: every rank (WORLD), or in a stage whose rows are per data rank
    (PPO/GRPO) at tensor (context) parallelism one rank of each tensor (context) group, whose
    `tensor` consecutive ranks hold the same rows: those then reduce over `group`, the data
    dimension's process group (engine/parallel/tensor_parallel.TensorParallel.data_ranks,
    context_parallel.ContextParallel.data_ranks)."""

    tensor: int = 1
    group: object = None

    def size(self) -> int:
        """The data ranks: world_size() / T, each holding its own rows."""
        return world_size() // self.tensor

    def rank(self) -> int:
        return rank() // self.tensor


WORLD = DataRanks()


def all_reduce_sum(values: dict, ranks: DataRanks = WORLD) -> dict:
    """Per-key sums over the (data) `ranks` of a dict of numbers (every rank passes the same
    keys), in float64 so counts stay exact; ints come back as ints."""
    if ranks.size() == 1:
        return dict(values)
    keys = sorted(values)
    buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(buf, group=ranks.group)
    return {k: int(v) if isinstance(values[k], int) else v for k, v in zip(keys, buf.tolist())}


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce_tensor(x: torch.Tensor, op: str = "sum", ranks: DataRanks = WORLD) -> torch.Tensor:
    """x [...] summed (or max-ed, min-ed) over the (data) `ranks`, as a new tensor on x's device
    (reduced there: NCCL for CUDA, gloo for CPU; no host copy, no host sync)."""
    if ranks.size() == 1:
        return x.clone()
    out = x.detach().clone()
    dist.all_reduce(out, op=_REDUCE_OPS[op], group=ranks.group)
    return out
