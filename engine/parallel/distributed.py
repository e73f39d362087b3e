"""Data parallelism over the ranks of one `torchrun` job: the process group, the data ranks' rows
and reductions, and FSDP2 sharding (`torch.distributed.fsdp.fully_shard`). The rank helpers and
collectives every layer uses (engine/ranks/world.py) and a sharded model's units
(engine/ranks/sharded.py) are imported here under their names, so a stage reads all of a job's
ranks from this one module.

Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) nothing here starts a process group and every
helper is the identity of one process: world_size() == 1, rank() == 0, reductions return their
input, shard() returns the model untouched. Under torchrun, `init_distributed` joins the group
(NCCL for CUDA tensors, gloo for CPU ones) with a timeout, so a collective waiting on a dead rank
fails instead of hanging; torchrun itself stops the other ranks when one exits with an error.

Convention of every stage: batch sizes are per rank (SFT/RM micro-batches and accumulation, PPO's
prompts per iteration and minibatch rows), so any world size runs any config and a step's global
batch is world_size() times a rank's, taken from the data stream in rank order (`rank_slice`);
each rank's loss is its share of the global loss (normalized by counts all-reduced over the ranks),
and FSDP averages the gradients over the ranks, so `backward(loss * world_size())` makes the reduced
gradient the global batch's gradient, as one process with the global batch would compute it.

With LoRA the adapted model's frozen base is sharded like any frozen model, while the few trainable
parameters (adapters, which live outside the model, and heads, kept out of FSDP with `keep`) are
plain tensors every rank holds whole, whose gradients `average_replicated_gradients` averages over
the ranks before each optimizer step, as FSDP does for its own in the backward.
"""
from __future__ import annotations

import datetime
import os
import sys
from collections import Counter
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigValueError
from ..ranks.sharded import fsdp_units, gathered, reshard, whole_value
from ..ranks.world import (WORLD, DataRanks, all_gather, all_reduce_sum, all_reduce_tensor, barrier,
                           broadcast, is_main, local_rank, local_world_size, rank, world_size)
from .dims import ParallelDims


def init_distributed(device_type: str, timeout_s: float) -> None:
    """Join torchrun's process group when WORLD_SIZE > 1 (once per process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    # On GPUs, NCCL for CUDA tensors (FSDP and the tensor reductions below) and gloo for CPU ones
    # (all_reduce_sum's host numbers, min_over_ranks / max_over_ranks, objects).
    backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        check_gpus_for_local_ranks()
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def check_gpus_for_local_ranks() -> None:
    """One GPU per local rank: more ranks on this node than visible GPUs is a usage error, said in
    one line before any process group starts (else CUDA's "invalid device ordinal" on the extra
    ranks)."""
    gpus = torch.cuda.device_count()
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if ranks > gpus:
        raise ConfigValueError(f"torchrun starts {ranks} ranks on this node but {gpus} GPU(s) are "
                               f"visible: expected --nproc-per-node <= {gpus}, or the CPU "
                               "(--device cpu / train.device=cpu)")


def leave(code: int) -> None:
    """A command's end with exit code `code`: a torchrun rank waits for the others, leaves the group
    and exits now (os._exit: its run-dir lock is a flock, released by the OS); one process returns.
    Gloo's threads can abort a rank in the interpreter's teardown ("terminate called without an
    active exception", seen in CI even past destroy_process_group): a good run reported failed."""
    if not dist.is_initialized():
        return
    dist.barrier()  # a rank done early (a generate rank that prints nothing) closes with the others
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def average_replicated_gradients(optimizers) -> None:
    """Average over the ranks the gradients of the optimizers' parameters that FSDP does not shard
    (plain tensors every rank holds whole: LoRA adapters and their heads) and over the replicas the
    gradients of expert-parallel experts (DTensors on the expert mesh: their replicas' mean); FSDP's
    own (other DTensors) are averaged in the backward already (tensor-parallel ones, LoRA's sliced
    adapters included, by TensorParallel.average_over_data). One flat all-reduce per group, device
    and dtype. Every rank must hold gradients for the same parameters (they ran the same forwards).
    One process: nothing."""
    if world_size() == 1:
        return
    from torch.distributed.tensor import DTensor
    groups: dict = {}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not isinstance(p, DTensor):
                    groups.setdefault((None, p.grad.device, p.grad.dtype), []).append(p.grad)
                elif "expert_replica" in (p.device_mesh.mesh_dim_names or ()):
                    replicas = p.device_mesh.get_group("expert_replica")
                    groups.setdefault((replicas, p.grad.device, p.grad.dtype),
                                      []).append(p.grad.to_local())
    for (process_group, _, _), grads in groups.items():
        if process_group is not None and dist.get_world_size(process_group) == 1:
            continue  # experts sharded over the whole world: no replica
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=process_group)
        flat /= dist.get_world_size(process_group)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def min_over_ranks(n: int, ranks: DataRanks = WORLD) -> int:
    """The smallest of every (data) rank's `n` (a host number: reduced on the CPU by gloo): what all
    ranks can do alike (e.g. rows each rank keeps)."""
    if world_size() == 1:
        return n
    return int(all_reduce_tensor(torch.tensor(n, dtype=torch.int64), "min", ranks))


def max_over_ranks(n: int, ranks: DataRanks = WORLD) -> int:
    """The largest of every (data) rank's `n` (a host number, reduced on the CPU by gloo)."""
    if world_size() == 1:
        return n
    return int(all_reduce_tensor(torch.tensor(n, dtype=torch.int64), "max", ranks))


def match_forwards(done: int, most: int, spare: Callable[[], object]) -> int:
    """Run spare() `most - done` times; returns how many. Under FSDP every forward (and backward)
    is a collective, and a token budget cuts each rank's rows into its own number of forwards: the
    ranks with fewer make up the difference with forwards that change nothing (spare: a forward
    whose output is dropped, or a backward of a loss times 0). `most` (max_over_ranks of the
    counts) must be agreed before the first forward: a reduction while another rank still runs
    forwards would meet that rank's FSDP collectives instead. One process: most == done."""
    for _ in range(most - done):
        spare()
    return most - done


def rank_slice(per_rank: int, ranks: DataRanks = WORLD) -> slice:
    """This rank's items of a global batch of `per_rank * ranks.size()` items, in rank order: the T
    ranks of a tensor group (consecutive ranks) take the same items."""
    index = ranks.rank()
    return slice(index * per_rank, (index + 1) * per_rank)


def data_parallel_sum(ranks: DataRanks = WORLD) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The `sum_over` of fusedrl.kernels' statistics: the sum over the data-parallel `ranks`
    (statistics of every rank's rows), None with one data rank (nothing to sum: the kernels'
    single-device path)."""
    return (lambda x: all_reduce_tensor(x, ranks=ranks)) if ranks.size() > 1 else None


def gather_rows(x: torch.Tensor, ranks: DataRanks = WORLD) -> torch.Tensor:
    """[R, ...] on each (data) rank -> [W * R, ...] on x's device, rank 0's rows first (the same R
    on every rank); gathered where x is (NCCL for CUDA, gloo for CPU)."""
    if ranks.size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(ranks.size())]
    dist.all_gather(parts, x.detach().contiguous(), group=ranks.group)
    return torch.cat(parts)


def own_rows(x: torch.Tensor, ranks: DataRanks = WORLD) -> torch.Tensor:
    """This (data) rank's rows of a gathered [W * R, ...] tensor."""
    return x[rank_slice(x.shape[0] // ranks.size(), ranks)]


def shard(model: nn.Module, mode: str = "shard", device_type: Optional[str] = None, keep=(),
          offload: bool = False, group_size: int = 0, mesh=None) -> nn.Module:
    """Shard `model` over the ranks with FSDP2, each decoder layer its own unit (so one layer's
    parameters are gathered at a time), a head of another dtype than the rest (the fp32 score or
    value head of a bf16 model) its own unit, and the rest (embeddings, final norm, LM head) the
    root unit. mode (train.data_parallel) "shard": full shard (parameters, gradients and optimizer
    state 1/N per rank); "replicate": every rank keeps whole parameters and optimizer state and
    gradients are all-reduced (HSDP with a shard group of one rank), for models small enough;
    "hybrid": HSDP, full shard within each group of `group_size` consecutive ranks (one node's by
    default: dims.shard_group_size) and whole copies across the groups, whose gradients FSDP
    all-reduces once per step (the one collective that crosses nodes); `mesh` given: over it instead
    (the data dimension of ParallelDims.mesh). One process: the model as is. Works on
    a model still on the meta device (engine/model/hf_io.load_model shards before it allocates):
    `device_type` then names the device it will live on.
    `keep`: modules whose parameters stay plain tensors every rank holds whole (the heads trained
    beside LoRA adapters: `average_replicated_gradients` averages theirs). A model already sharded
    is returned as is. offload (train.optimizer_offload, train.frozen_offload): FSDP2's
    CPUOffloadPolicy: the sharded parameters, their gradients and so the optimizer state rest in CPU
    memory (pinned on CUDA), copied to the device for each unit's all-gather, gradients copied back
    in backward, the optimizer step on the CPU; `model.offloaded` says so (hf_io.load_model then
    materializes the shards in CPU memory, where FSDP2 wants them)."""
    if world_size() == 1 or fsdp_units(model):
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    device_type = device_type or next(model.parameters()).device.type
    if mesh is None:
        mesh = ParallelDims.data_only(mode, world_size(), device_type, group_size).sub("data")
    if offload and keep:
        raise ValueError(
            "offload: the kept (whole) modules would rest in CPU memory too; offload a model "
            "without kept heads (a full fine-tune, a frozen model)")
    # Pinned host memory needs CUDA; on a CPU run the shards are where they already are.
    policy = CPUOffloadPolicy(pin_memory=device_type == "cuda") if offload else OffloadPolicy()
    ignored = {p for module in keep for p in module.parameters()}
    for unit in shard_units(model, keep):
        fully_shard(unit, mesh=mesh, ignored_params=ignored or None, offload_policy=policy)
    model.offloaded = offload
    return model


def sharder(mode: str, device, keep: Callable[[nn.Module], list] = lambda model: [],
            offload: bool = False, group_size: int = 0) -> Callable:
    """shard(model) as `hf_io.load_model` takes it: `shard` in `mode` (with `group_size`) onto
    `device`'s type, keeping whole the modules keep(model) names (a LoRA run's trained heads),
    offloaded or not (`shard`)."""
    device_type = torch.device(device).type
    return lambda model: shard(model, mode, device_type, keep(model), offload, group_size)


def shard_units(model: nn.Module, keep=()) -> list[nn.Module]:
    """The modules `shard` makes FSDP units, inner ones first and `model` (the root unit) last:
    each decoder layer, then each module holding parameters of another dtype than the rest (an
    FSDP unit holds one dtype: the fp32 score / value heads of bf16 models), but for the `keep`
    modules (left whole). The memory plan (engine/plan) reads the same list."""
    layers = list(getattr(getattr(model, "model", None), "layers", []))
    main_dtype = Counter(p.dtype for p in model.parameters()).most_common(1)[0][0]
    odd = [module for module in list(model.modules())[1:]
           if not any(module is k for k in keep)
           and any(p.dtype != main_dtype for p in module.parameters(recurse=False))]
    return layers + odd + [model]


def all_reduce_in_backward(model: nn.Module, now: bool) -> None:
    """Whether `model`'s next backward all-reduces its gradient shards across the shard groups
    (HSDP's replicas: the nodes, at train.data_parallel=hybrid). When not, FSDP2 still
    reduce-scatters within the group and keeps the result, added into the next all-reduce: a step
    of several backwards then crosses the network once, in its last. No-op without a replicate
    dimension (full shard, one process)."""
    for unit in fsdp_units(model):
        unit.set_requires_all_reduce(now, recurse=False)
