"""Loading a checkpoint into a run: first every check that it fits (the same parts, every tensor's
name, shape and dtype, the optimizers' parameter groups, the schedulers), a one-line
`CheckpointMismatch` naming the first difference and both values; only then the copies, each rank
reading the boxes of its own shards (`Source.read`), so any world size resumes any checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ...runs.durable import CorruptDirectory
from ...errors import UsageError
from ...parallel import distributed
from .parts import (Trainables, check_rng_state, module_tensors, row_layouts, optimizer_key,
                    optimizer_parameters, parameter_names, set_rng_state)
from .shards import DTYPES, dtype_name, local_chunk


class CheckpointMismatch(UsageError):
    """A checkpoint that does not fit the run resuming it (another model, depth, width, LoRA rank,
    precision or stage): nothing was loaded."""


@dataclass
class Source:
    """A checkpoint opened for loading.
    index: {tensor name: {"dtype": name, "shape": [...]}}; read(name, offsets, sizes) -> that box of
    the tensor (CPU); data: {"models", "modules", "optimizers", "schedulers", "loop"} as
    parts.trainer_state describes them; rng(rank) -> (RNG tensors, python RNG state) of that
    rank."""
    path: Path
    index: dict
    read: Callable[[str, list, list], torch.Tensor]
    data: dict
    rng: Callable[[int], tuple]


def mismatch(path: Path, what: str) -> CheckpointMismatch:
    return CheckpointMismatch(
        f"checkpoint {path} does not fit this run: {what}; resume with the model and "
        "options it was written with, or start a new run in another output_dir")


def check_parts(path: Path, parts: Trainables, models: list, modules: list) -> None:
    """CheckpointMismatch unless the checkpoint's `models` and `modules` (names, sorted) are the
    run's."""
    for kind, there, here in (("models", models, sorted(parts.models)),
                              ("modules", modules, sorted(parts.small_modules))):
        if list(there) != here:
            raise mismatch(path, f"it holds the {kind} {list(there)}, this run {here}")


def _check_tensors(source: Source, targets: dict[str, torch.Tensor]) -> None:
    """Every model and module tensor of the run is in the checkpoint with its shape and dtype, and
    no other."""
    for name, tensor in targets.items():
        entry = source.index.get(name)
        if entry is None:
            raise mismatch(source.path, f"tensor {name} of this run is not in it")
        if entry["shape"] != list(tensor.shape):
            raise mismatch(source.path,
                           f"tensor {name} has shape {entry['shape']} there, {list(tensor.shape)} "
                           "here")
        if entry["dtype"] != dtype_name(tensor.dtype):
            raise mismatch(source.path,
                           f"tensor {name} is {entry['dtype']} there, {dtype_name(tensor.dtype)} "
                           "here")
    held = sorted(n for n in source.index if n.startswith(("models.", "modules.")))
    extra = [n for n in held if n not in targets]
    if extra:
        raise mismatch(source.path,
                       f"it holds tensor {extra[0]}, which this run lacks ({len(held)} model "
                       f"tensors there, {len(targets)} here)")


def _check_groups(path: Path, i: int, there: list[list[str]], here: list[list[str]]) -> None:
    if len(there) != len(here):
        raise mismatch(path,
                       f"optimizer {i} has {len(there)} parameter groups there, {len(here)} here")
    for g, (a, b) in enumerate(zip(there, here)):
        if a != b:
            first = next((x, y) for x, y in zip(a + [None], b + [None]) if x != y)
            raise mismatch(path,
                           f"optimizer {i} group {g} trains {len(a)} parameters there, {len(b)} "
                           "here "
                           f"(first difference: {first[0]} there, {first[1]} here)")


def _optimizer_plan(source: Source, parts: Trainables) -> list[dict]:
    """Each optimizer's state dict to load (positional, as torch's Optimizer.load_state_dict takes
    it), with empty tensors shaped and sharded like their parameters, to be filled; checks first."""
    saved = source.data["optimizers"]
    if len(saved) != len(parts.optimizers):
        raise mismatch(source.path,
                       f"it holds {len(saved)} optimizers, this run {len(parts.optimizers)}")
    names = parameter_names(parts)
    plans = []
    for i, (optimizer, entry) in enumerate(zip(parts.optimizers, saved)):
        groups = optimizer_parameters(optimizer, names)
        _check_groups(source.path, i, [g["params"] for g in entry["param_groups"]], groups)
        order = [name for group in groups for name in group]
        params = dict(zip(order, (p for group in optimizer.param_groups for p in group["params"])))
        state = {}
        for position, name in enumerate(order):
            own = dict(entry["value_state"].get(name, {}))
            for key in entry["tensor_state"].get(name, []):
                own[key] = _state_tensor(source, optimizer_key(i, name, key), params[name])
            if own:
                state[position] = own
        param_groups, start = [], 0
        for group, current in zip(entry["param_groups"], optimizer.param_groups):
            # JSON has no tuples: a value that is a tuple in the run's group (AdamW's betas) is one
            # again.
            hyper = {k: tuple(v) if isinstance(current.get(k), tuple) else v
                     for k, v in group.items() if k != "params"}
            param_groups.append(
                {**hyper, "params": list(range(start, start + len(group["params"])))})
            start += len(group["params"])
        plans.append({"state": state, "param_groups": param_groups})
    return plans


def _state_tensor(source: Source, name: str, param: torch.Tensor) -> torch.Tensor:
    """An empty tensor for optimizer state `name`: sharded like `param` when it has the parameter's
    shape (moments, masters), else a plain one on the parameter's device (a 0-dim step)."""
    entry = source.index.get(name)
    if entry is None:
        raise CorruptDirectory(
            f"{source.path}: optimizer state {name} is listed but not in the index")
    dtype = DTYPES[entry["dtype"]]
    if entry["shape"] == list(param.shape):
        return torch.empty_like(param, dtype=dtype)
    if entry["shape"] == []:
        return torch.empty((), dtype=dtype, device=local_chunk(param)[0].device)
    raise mismatch(source.path,
                   f"optimizer state {name} has shape {entry['shape']} there, its parameter "
                   f"{list(param.shape)} here")


def _check_schedulers(source: Source, parts: Trainables) -> None:
    saved = source.data["schedulers"]
    if len(saved) != len(parts.schedulers):
        raise mismatch(source.path,
                       f"it holds {len(saved)} schedulers, this run {len(parts.schedulers)}")
    for i, (scheduler, state) in enumerate(zip(parts.schedulers, saved)):
        if sorted(state) != sorted(scheduler.state_dict()):
            raise mismatch(source.path, f"scheduler {i} has the fields {sorted(state)} there, "
                                        f"{sorted(scheduler.state_dict())} here")


@torch.no_grad()
def _fill(source: Source, name: str, tensor: torch.Tensor) -> None:
    """Copy this rank's box of checkpoint tensor `name` into `tensor` (its local shard when
    sharded)."""
    local, offsets = local_chunk(tensor)
    local.copy_(source.read(name, offsets, list(local.shape)))


def restore(source: Source, parts: Trainables,
            check_loop: Callable[[Path, object], None] | None = None) -> dict:
    """Check that `source` fits `parts` (CheckpointMismatch otherwise, with nothing loaded), that
    its RNG states are RNG states and its loop state passes `check_loop(path, loop state)` (which
    raises CorruptDirectory or a UsageError), then restore the models, small modules, optimizers,
    schedulers and this rank's RNG states from it; returns the loop state. Collective only in that
    every rank reads the same checkpoint."""
    if check_loop is not None:
        check_loop(source.path, source.data.get("loop"))
    check_parts(source.path, parts, source.data["models"], source.data["modules"])
    # older checkpoints: every model T=1
    there, here = source.data.get("row_layouts", {}), row_layouts(parts)
    for name in parts.models:
        if there.get(name, 1) != here.get(name, 1):
            raise mismatch(source.path,
                           f"its {name} rows are laid out for "
                           f"train.tensor_parallel={there.get(name, 1)}, this run's for "
                           f"{here.get(name, 1)}")
    targets = module_tensors(parts)
    _check_tensors(source, targets)
    plans = _optimizer_plan(source, parts)
    _check_schedulers(source, parts)
    rng = source.rng(distributed.rank())
    check_rng_state(source.path, *rng)
    for name, tensor in targets.items():
        _fill(source, name, tensor)
    for i, (optimizer, plan) in enumerate(zip(parts.optimizers, plans)):
        order = [name for group in source.data["optimizers"][i]["param_groups"]
                 for name in group["params"]]
        for position, state in plan["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    _fill(source, optimizer_key(i, order[position], key), value)
        optimizer.load_state_dict(plan)
    for scheduler, state in zip(parts.schedulers, source.data["schedulers"]):
        scheduler.load_state_dict(dict(state))
    set_rng_state(*rng)
    return source.data["loop"]
