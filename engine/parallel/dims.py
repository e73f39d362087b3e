"""The parallel layout of a job as one object: how its ranks divide into named dimensions, and the
one device mesh over them.

`ParallelDims` is built once, from the stage's `train` section and the launch (torchrun's world
size and the device), by `ParallelDims.from_train`; every model of the stage is laid out from it
(engine/parallel/layout.py) and every refusal of an option combination reads it
(engine/parallel/validate.py). Its dimensions, whose product is the world size:

- data_replicate: groups holding whole copies of the data shards (FSDP2's HSDP replicas; at
  train.tensor_parallel > 1 with train.data_parallel=replicate, copies of the tensor slices);
- data_shard: the ranks over which FSDP2 shards weights, gradients and optimizer state;
- context: ranks sharing each packed forward's tokens (train.context_parallel;
  engine/parallel/context_parallel.py; 1: every rank forwards whole packs);
- tensor: ranks holding the tensor slices of every weight (engine/parallel/tensor_parallel.py).

`expert` (train.expert_parallel) is not a factor of the product: the experts of every MoE block are
sharded over groups of `expert` consecutive ranks of the data-shard dimension
(engine/parallel/expert_parallel.py), the rest of the model sharded over all of them.

The mesh (`mesh()`) is the one torch DeviceMesh of the job, its dimensions named, built on first
use and shared by every model (the optimizers clip the DTensors of several models together):
(data, tensor) at T > 1, (data, context) at C > 1 (a context group: C consecutive ranks), (data,
context, tensor) at both (C x T consecutive ranks hold the same rows), (expert_replica, expert) at
E > 1, (replicate, shard) with replicas, else (shard,). `sub(name)` is a named sub-mesh: "data"
(the ranks FSDP2 shards or replicates over: data x context at C > 1, whose context ranks share the
weights) and the mesh's own dimension names.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch.distributed as dist

from ..errors import ConfigValueError


@dataclass(frozen=True)
class ParallelDims:
    """The named dimensions of a job of `world` ranks on `device_type` (see the module docstring);
    data_parallel: train.data_parallel's mode, kept for the layout of frozen models and the plan."""

    world: int = 1
    data_replicate: int = 1
    data_shard: int = 1
    context: int = 1
    tensor: int = 1
    expert: int = 1
    data_parallel: str = "shard"
    device_type: str = "cpu"
    optimizer_offload: bool = False
    frozen_offload: bool = False
    expert_capacity_factor: float = 0.0  # train.expert_capacity_factor (0: variable splits)

    def __post_init__(self):
        product = self.data_replicate * self.data_shard * self.context * self.tensor
        if product != self.world:
            raise ValueError(f"parallel dimensions {self.data_replicate} x {self.data_shard} x "
                             f"{self.context} x {self.tensor} (replicate x shard x context x "
                             f"tensor) on {self.world} ranks: expected their product to be the "
                             "world size")

    @classmethod
    def from_train(cls, train, world: int, device_type: str,
                   local_world: int | None = None) -> "ParallelDims":
        """The dims of a stage's `train` section on `world` ranks of nodes of `local_world`
        (default: torchrun's LOCAL_WORLD_SIZE) on `device_type`. At train.tensor_parallel = T > 1
        the world / T data groups shard the slices (train.data_parallel=shard) or copy them
        (replicate); at train.context_parallel = C > 1 world / C data ranks; else
        train.data_parallel's shard group (shard_group_size). Checks nothing
        engine/parallel/validate.py checks: call that first."""
        t, c = train.tensor_parallel, train.context_parallel
        data = world // (t * c)
        if t > 1 or c > 1:
            shard = data if train.data_parallel == "shard" else 1
        else:
            shard = shard_group_size(train.data_parallel, world, train.shard_group_size,
                                     local_world)
        return cls(world, data // shard, shard, c, t, train.expert_parallel, train.data_parallel,
                   device_type, train.optimizer_offload, train.frozen_offload,
                   train.expert_capacity_factor)

    @classmethod
    def data_only(cls, mode: str, world: int, device_type: str,
                  group_size: int = 0) -> "ParallelDims":
        """Data parallelism alone in train.data_parallel `mode` (shard_group_size's group)."""
        shard = shard_group_size(mode, world, group_size)
        return cls(world, world // shard, shard, data_parallel=mode, device_type=device_type)

    @property
    def data(self) -> int:
        """Ranks holding different rows: data_replicate x data_shard."""
        return self.data_replicate * self.data_shard

    def names(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """(names, sizes) of the mesh's dimensions."""
        if self.tensor > 1 and self.context > 1:
            return ("data", "context", "tensor"), (self.data, self.context, self.tensor)
        if self.tensor > 1:
            return ("data", "tensor"), (self.data, self.tensor)
        if self.context > 1:
            return ("data", "context"), (self.data, self.context)
        if self.expert > 1:
            return ("expert_replica", "expert"), (self.world // self.expert, self.expert)
        if self.data_replicate > 1:
            return ("replicate", "shard"), (self.data_replicate, self.data_shard)
        return ("shard",), (self.world,)

    def mesh(self):
        """The job's DeviceMesh (module docstring)."""
        names, sizes = self.names()
        return device_mesh(self.device_type, sizes, names)

    def sub(self, name: str):
        """The named sub-mesh: "data" (the ranks FSDP2 shards over, HSDP's (replicate, shard)
        pair, or with experts every rank) or a dimension of the mesh."""
        names, sizes = self.names()
        return sub_mesh(self.device_type, sizes, names, name)


def shard_group_size(mode: str, world: int, group_size: int = 0,
                     local_world: int | None = None) -> int:
    """The ranks of one FSDP shard group in train.data_parallel `mode` on `world` ranks: shard:
    all of them; replicate: 1; hybrid: `group_size` (train.shard_group_size), 0 meaning one node's
    ranks (`local_world`, default torchrun's LOCAL_WORLD_SIZE), since torchrun numbers the ranks
    node by node: a group of consecutive ranks is one node's. A ConfigValueError unless it divides
    `world`."""
    if mode != "hybrid":
        return 1 if mode == "replicate" else world
    if local_world is None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    size = group_size or local_world
    if size < 1 or world % size:
        given = (f"train.shard_group_size={size}" if group_size else
                 f"train.shard_group_size=0 (one node's ranks: torchrun's LOCAL_WORLD_SIZE={size})")
        raise ConfigValueError(f"{given} with train.data_parallel=hybrid: expected a size dividing "
                               f"the {world} ranks (set train.shard_group_size to one)")
    return size


@functools.cache
def device_mesh(device_type: str, sizes: tuple[int, ...], names: tuple[str, ...]):
    """The DeviceMesh of `sizes` ranks along `names`, made once per process and layout: the one
    place a mesh is made, so every model's DTensors share it."""
    from torch.distributed.device_mesh import init_device_mesh
    if dist.get_world_size() != functools.reduce(lambda a, b: a * b, sizes):
        raise ValueError(f"a device mesh of {sizes} ranks on a world of {dist.get_world_size()}")
    return init_device_mesh(device_type, sizes, mesh_dim_names=names)


@functools.cache
def sub_mesh(device_type: str, sizes: tuple[int, ...], names: tuple[str, ...], name: str):
    """ParallelDims.sub of the mesh of `sizes` along `names`, one object per name (the optimizer
    groups DTensors by their mesh)."""
    mesh = device_mesh(device_type, sizes, names)
    # context ranks share the weights: FSDP2 over both
    if name == "data" and names[:2] == ("data", "context"):
        return mesh["data", "context"]._flatten("data_context")
    if name != "data" or names == ("data", "tensor"):
        return mesh if names == (name,) else mesh[name]
    if names in (("shard",), ("replicate", "shard")):  # FSDP2's full shard, or HSDP over both
        return mesh
    # The experts' (replica, expert) ranks as one: FSDP2 over every rank around the experts.
    return mesh._flatten("data")
