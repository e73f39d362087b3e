"""Persistent gathered weights (rollout.persistent_weights): under torchrun, generation reads whole
copies of the policy's FSDP2-sharded parameters (at train.tensor_parallel > 1 with the slices
sharded over the data groups: whole tensor slices) that are allocated once and refilled in place
before every rollout, so the storage a CUDA graph captured never moves.
(`distributed.gathered`'s unshard() allocates the whole parameters anew each time, which is why
graphs are off on that path.)

`PersistentWeights(model, device)` allocates on `device` one buffer per sharded parameter (tied
parameters share one): its whole rows rounded up to the sharded mesh dimension's equal shards
(FSDP2 cuts dim 0 as torch.chunk does: every shard ceil(rows / N) rows, the last ones shorter or
empty), the parameter a view of its first rows, so an all-gather writes straight into it. A
parameter whose local tensor is already whole on `device` (data_parallel=replicate: shards of one
rank) is read as it is: no copy, no bytes. Expert-parallel experts (DTensors sharded over the
world, parallel/expert_parallel.py) are gathered like FSDP's shards. A tensor-parallel slice sharded
over the data groups (engine/parallel/tensor_parallel.py) is gathered over the data dimension only,
into a buffer of its slice, which generation reads as a DTensor on the tensor ranks (the walk's
tensor-parallel GEMMs take its local rows).

`active()` refills the buffers (one all_gather_into_tensor per parameter: collective, every rank
enters together), puts the whole tensors in the modules' parameter slots in place of the DTensors,
marks the model `past_fsdp_hooks` (the walk enters the root and the layers past FSDP's hooks, so
FSDP never unshards) and lets expert-parallel blocks run every expert locally; all restored on exit,
where training finds its DTensors as it left them. The cost: one whole copy of the policy per GPU
for the whole run (the memory plan counts it in every phase), in exchange for CUDA-graph decode.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from . import distributed
from .expert_parallel import experts_run_locally


@dataclass
class _Whole:
    """One sharded parameter as generation reads it."""

    sharded: nn.Parameter          # the DTensor training holds (FSDP2's shard, or an expert shard)
    # [*shape] on the device: a view of `padded`, or the local tensor itself
    whole: nn.Parameter
                                   # (a tensor slice: a DTensor on the tensor ranks over that view)
    # [N * ceil(rows / N), ...] gathered into; None: the local tensor as is
    padded: torch.Tensor | None
    group: object                  # the sharded mesh dimension's process group; None: whole locally


class PersistentWeights:
    """Whole-size buffers of `model`'s DTensor parameters on `device` (default: the parameters'),
    allocated once; `active()` refills them and walks the model on them."""

    def __init__(self, model: nn.Module, device=None):
        from torch.distributed.tensor import DTensor
        distributed.reshard(model)  # every FSDP unit back to its DTensor shards
        self.model = model
        self.device = (torch.device(device) if device is not None
                       else next(model.parameters()).device)
        # compared with the shards' devices
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # model.parameters() yields a tied parameter once: the LM head and the embedding share a
        # buffer.
        self.wholes = {id(p): self._allocate(p) for p in model.parameters()
                       if isinstance(p, DTensor)}

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers this object allocated (0 for parameters read as they are)."""
        return sum(w.padded.nbytes for w in self.wholes.values() if w.padded is not None)

    def _allocate(self, param) -> _Whole:
        mesh, placements = param.device_mesh, param.placements
        # The tensor dimension of a tensor-parallel slice stays split: generation reads the slice.
        names = mesh.mesh_dim_names or ()
        tensor = names.index("tensor") if "tensor" in names else None
        split = [d for d, p in enumerate(placements)
                 if d != tensor and not p.is_replicate() and mesh.size(d) > 1]
        if len(split) > 1 or (split and placements[split[0]].dim != 0):
            raise ValueError(
                f"persistent weights: a parameter placed {placements} on a mesh of "
                f"{tuple(mesh.shape)} "
                "ranks; expected rows (Shard(0)) split over one mesh dimension (FSDP2 at "
                "train.tensor_parallel=1, or over the data groups of tensor slices)")
        with torch.no_grad():
            local = param.to_local().detach()
        # already whole here, updated in place by the optimizer
        if not split and local.device == self.device:
            return _Whole(param, nn.Parameter(local, requires_grad=False), None, None)
        shape = list(param.shape)
        if tensor is not None:  # this tensor rank's slice, as DTensor cuts it
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
            shape = list(
                compute_local_shape_and_global_offset(shape, mesh["tensor"],
                                                      [placements[tensor]])[0])
        shards = mesh.size(split[0]) if split else 1
        rows = -(-shape[0] // shards)
        padded = torch.empty((shards * rows, *shape[1:]), dtype=param.dtype, device=self.device)
        whole = padded[:shape[0]]
        if tensor is not None:
            from torch.distributed.tensor import DTensor
            whole = DTensor.from_local(whole, mesh["tensor"], [placements[tensor]], run_check=False,
                                       shape=param.shape, stride=param.stride())
        return _Whole(param, nn.Parameter(whole, requires_grad=False), padded,
                      mesh.get_group(split[0]) if split else None)

    @torch.no_grad()
    def refill(self) -> None:
        """Every buffer from the current shards, in place (collective: one all-gather a
        parameter)."""
        for w in self.wholes.values():
            local = w.sharded.to_local()
            if w.padded is None:
                if local.data_ptr() != w.whole.data_ptr():
                    raise RuntimeError(
                        "persistent weights: a whole local parameter moved since the buffers were "
                        "made; a captured CUDA graph would read freed memory")
                continue
            if w.group is None:
                w.whole.copy_(local)
                continue
            rows = w.padded.shape[0] // dist.get_world_size(w.group)
            if local.shape[0] != rows or local.device != self.device or not local.is_contiguous():
                # A short (or empty) last shard, or one resting in CPU memory: staged at full size
                # here.
                staged = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype,
                                     device=self.device)
                staged[:local.shape[0]].copy_(local)
                local = staged
            dist.all_gather_into_tensor(w.padded, local, group=w.group)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside: the model's parameters are the refilled whole buffers and its walk runs past
        FSDP's hooks (no collective, whatever the number of forwards). Collective on entry."""
        from torch.distributed.tensor import DTensor
        # a root unit left gathered by a forward: back to its DTensors
        distributed.reshard(self.model)
        self.refill()
        slots = [(module, name, p) for module in self.model.modules()
                 for name, p in module._parameters.items() if id(p) in self.wholes]
        for module, name, p in slots:  # as FSDP2 itself swaps sharded and unsharded parameters
            module._parameters[name] = self.wholes[id(p)].whole
        try:
            made = {id(w.whole) for w in self.wholes.values()}
            stray = next(
                (n for n, p in self.model.named_parameters()
                 if isinstance(p, DTensor) and id(p) not in made),
                None)
            if stray is not None:
                raise RuntimeError(
                    f"persistent weights: {stray} is a DTensor made after the buffers were")
            self.model.past_fsdp_hooks = True
            with experts_run_locally(self.model):
                yield
        finally:
            self.model.past_fsdp_hooks = False
            for module, name, p in slots:
                module._parameters[name] = p
