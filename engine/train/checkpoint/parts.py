"""What a checkpoint holds, as tensors by name plus plain data: `Trainables` (the stage's models,
optimizers, schedulers and small modules) and the RNG states, taken apart for saving
(`trainer_state`) and the names that tie them together on loading.

Tensor names (the keys of the checkpoint's index, the same at every world size):
    models.<part>.<state dict key>       each trained model (SFT `model`, PPO `policy`, ...)
    modules.<name>.<state dict key>      the small modules (PPO's shared value head)
    optimizers.<i>.<parameter>.<state>   the i-th optimizer's state per parameter, the parameter
    named
                                         by its qualified name under its part
                                         (`policy.model.norm.weight`), e.g. FusedAdamW's fp32
                                         `master`, `exp_avg`, `exp_avg_sq`, `step`
Everything else (optimizer hyperparameters per group, the schedulers' state dicts, the loop state)
is plain data, written as JSON.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ...model.causal_lm import PackedProjection


@dataclass
class SavedModel:
    """A trained model of a checkpoint. `load(directory) -> module` reads the model's own directory
    in checkpoints of the earlier layout (a Hugging Face or PEFT directory per model), whose state
    dict is then copied into `module`."""
    module: nn.Module
    load: Callable[[Path], nn.Module]


@dataclass
class Trainables:
    """What a stage's checkpoint holds besides its loop state."""
    models: dict[str, SavedModel]
    optimizers: list[torch.optim.Optimizer]
    schedulers: list
    small_modules: dict[str, nn.Module] = field(default_factory=dict)


def module_tensors(parts: Trainables) -> dict[str, torch.Tensor]:
    """Every model's and small module's state dict under its checkpoint name. The values alias the
    modules' own parameters and buffers (DTensors when sharded), so copying into them restores
    them."""
    out = {}
    for name, model in parts.models.items():
        out.update({f"models.{name}.{k}": v for k, v in model.module.state_dict().items()})
    for name, module in parts.small_modules.items():
        out.update({f"modules.{name}.{k}": v for k, v in module.state_dict().items()})
    return out


def parameter_names(parts: Trainables) -> dict[int, str]:
    """id(parameter) -> its qualified name under its part: the same name at every world size."""
    holder = nn.ModuleDict(
        {**{name: m.module for name, m in parts.models.items()}, **parts.small_modules})
    return {id(p): name for name, p in holder.named_parameters()}


def optimizer_parameters(optimizer: torch.optim.Optimizer,
                         names: dict[int, str]) -> list[list[str]]:
    """The names of each group's parameters, in the optimizer's order."""
    try:
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    except KeyError:
        raise ValueError("an optimizer trains a parameter that no checkpoint part holds") from None


def optimizer_key(i: int, param: str, state: str) -> str:
    return f"optimizers.{i}.{param}.{state}"


def trainer_state(parts: Trainables) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors by name, plain data) of `parts`: the models' and optimizers' tensors, and the
    optimizers' groups and non-tensor state and the schedulers' state dicts."""
    tensors = module_tensors(parts)
    names = parameter_names(parts)
    optimizers = [named_optimizer_state(i, optimizer.state_dict(),
                                        [n for group in optimizer_parameters(optimizer, names)
                                         for n in group], tensors)
                  for i, optimizer in enumerate(parts.optimizers)]
    data = {"models": sorted(parts.models), "modules": sorted(parts.small_modules),
            "optimizers": optimizers, "schedulers": [s.state_dict() for s in parts.schedulers],
            "row_layouts": row_layouts(parts)}
    return tensors, data


def row_layouts(parts: Trainables) -> dict[str, int]:
    """{model: T} of the models whose packed projections (q/k/v, gate/up) hold their rows
    rank-interleaved for T tensor ranks (engine/parallel/tensor_parallel.py): a checkpoint's rows
    are only read back into the same layout (the tensors' names and shapes do not show it)."""
    return {name: t for name, model in parts.models.items()
            if (
                t := max(
                    (m.tensor_parallel for m in model.module.modules()
                     if isinstance(m, PackedProjection)),
                    default=1)) > 1}


def named_optimizer_state(i: int, state_dict: dict, order: list[str], tensors: dict) -> dict:
    """Optimizer i's `state_dict` (torch's: parameters by their position in the groups), its
    parameters named by `order` (the names in group order): the plain data
    {"param_groups": [hyperparameters and "params" by name], "tensor_state": {param: [state keys]},
    "value_state": {param: {key: value}}}; its state tensors are added to `tensors`."""
    name_of = dict(
        zip((p for group in state_dict["param_groups"] for p in group["params"]), order,
            strict=True))
    tensor_state, value_state = {}, {}
    for position, state in state_dict["state"].items():
        param = name_of[position]
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[optimizer_key(i, param, key)] = value
                tensor_state.setdefault(param, []).append(key)
            else:
                value_state.setdefault(param, {})[key] = value
    groups = [
        {**{k: v for k, v in group.items() if k != "params"},
         "params": [name_of[p] for p in group["params"]]}
        for group in state_dict["param_groups"]]
    return {"param_groups": groups, "tensor_state": tensor_state, "value_state": value_state}


def rng_state() -> tuple[dict[str, torch.Tensor], list]:
    """This process's RNG states: (torch CPU and CUDA states as tensors, python's as plain data)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss_next = random.getstate()
    return tensors, [version, list(internal), gauss_next]


def check_rng_state(where, tensors: dict, python) -> None:
    """CorruptDirectory naming `where` unless `tensors` and `python` are RNG states as `rng_state`
    returns them: torch's a uint8 vector of this torch's length (CUDA's of theirs), python's
    [version, 625 ints in [0, 2^32), None or a float]."""
    from ...runs.durable import CorruptDirectory

    own = torch.get_rng_state()
    cuda_shape = torch.cuda.get_rng_state().shape if torch.cuda.is_available() else None
    for key, state in tensors.items():
        shape = own.shape if key == "rng.torch" else cuda_shape
        wrong_shape = shape is not None and state.shape != shape
        if state.dtype != torch.uint8 or state.dim() != 1 or wrong_shape:
            expected = list(shape) if shape is not None else "[N]"
            raise CorruptDirectory(f"{where}: RNG state {key} is {state.dtype} "
                                   f"{list(state.shape)}, expected torch.uint8 {expected}")
    if "rng.torch" not in tensors:
        raise CorruptDirectory(f"{where}: no torch RNG state (rng.torch)")
    ok = (isinstance(python, list) and len(python) == 3 and type(python[0]) is int
          and isinstance(python[1], list) and len(python[1]) == 625
          and all(type(x) is int and 0 <= x < 2**32 for x in python[1])
          and (python[2] is None or type(python[2]) is float))
    if not ok:
        raise CorruptDirectory(f"{where}: python's RNG state is not [version, 625 ints, None or "
                               "float]")


def set_rng_state(tensors: dict[str, torch.Tensor], python: list) -> None:
    """Restore what `rng_state` returned (CUDA states only where CUDA is, for as many devices as
    both have)."""
    version, internal, gauss_next = python
    random.setstate((version, tuple(internal), gauss_next))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        for device, state in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)
