"""The one layout function: a model laid out over a job's ranks for its role in the stage.

`layout(model, role, dims)` is what every stage calls for every model it loads (through
hf_io.load_model's `shard`, on the meta device, so that each rank reads only its part), the policy
and the reference, the reward model and the critic, a LoRA base alike. The role says what the
model does; `dims` (engine/parallel/dims.py) how the ranks divide:

- "trained": trained in full (SFT's and RM's model, the policy): its experts sharded over expert
  groups at dims.expert > 1 (expert_parallel.shard_for_training); its tensor slices at
  dims.tensor > 1, sharded over the data groups at train.data_parallel=shard
  (tensor_parallel.shard_tensor_parallel); else FSDP2 in train.data_parallel's mode (at
  dims.context > 1 over every rank, the model's `context_parallel` its context group).
  Offloaded at train.optimizer_offload.
- "critic": trained in full beside an expert-parallel policy: as "trained", but FSDP2 alone for
  its (dense) weights.
- "frozen": never trained (the reference, the reward model scoring): as "trained" without experts,
  offloaded at train.frozen_offload.
- "adapted": the frozen base of LoRA adapters: its tensor slices copied across the data groups (the
  adapters are sliced like them, model/lora.py), else FSDP2; never offloaded; `keep` names the
  heads trained beside the adapters, left whole.
- "head": the small value head shared with the policy: FSDP2 beside a whole trunk, whole beside
  tensor slices (whose hidden states every tensor rank holds whole).

One process, or a model laid out already: the model as is.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..model.causal_lm import CausalLM
from . import distributed
from .context_parallel import ContextParallel
from .dims import ParallelDims
from .expert_parallel import shard_for_training
from .tensor_parallel import shard_tensor_parallel

ROLES = ("trained", "critic", "frozen", "adapted", "head")


def layout(model: nn.Module, role: str, dims: ParallelDims, keep=()) -> nn.Module:
    """`model` (whole, or on the meta device) laid out in place for `role` over `dims` (the module
    docstring); `keep`: modules left whole on every rank ("adapted": the heads trained beside LoRA
    adapters). Returns `model`."""
    if role not in ROLES:
        raise ValueError(f"role={role!r}: expected one of {ROLES}")
    if dims.world == 1 or distributed.fsdp_units(model) or (
            isinstance(model, CausalLM) and model.tensor_parallel is not None):
        return model
    offload = {"trained": dims.optimizer_offload, "critic": dims.optimizer_offload,
               "frozen": dims.frozen_offload}.get(role, False)
    if dims.expert > 1 and role == "trained":
        return shard_for_training(model, dims)
    if dims.tensor > 1:
        if role == "head":
            return model
        data_shard = role != "adapted" and dims.data_parallel == "shard"
        return with_context(
            shard_tensor_parallel(model, dims, data_shard=data_shard, offload=offload), dims)
    distributed.shard(model, dims.data_parallel, dims.device_type, list(keep), offload,
                      mesh=dims.sub("data"))
    return with_context(model, dims)


def with_context(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """`model` with its context group (`context_parallel`) at dims.context > 1 (a CausalLM's)."""
    if dims.context > 1 and isinstance(model, CausalLM):
        mesh = dims.mesh()
        model.context_parallel = ContextParallel(dims.context, mesh.get_local_rank("context"),
                                                 mesh.get_group("context"), mesh.get_group("data"),
                                                 dims.tensor)
    return model


def layout_at_load(role: str, dims: ParallelDims,
                   keep: Callable[[nn.Module], list] = lambda model: []) -> Callable:
    """The layout for `role` as a function of the model, applied by hf_io.load_model (its `shard`)
    while the model is on the meta device: model -> layout(model, role, dims, keep(model))."""
    return lambda model: layout(model, role, dims, keep(model))
