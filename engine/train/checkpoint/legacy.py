"""Checkpoints of the earlier layouts, opened as a `restore.Source` so they resume like current
ones.

One process wrote:
    <part>/             each model as its own Hugging Face or PEFT directory (SavedModel.load reads
    it) trainer_state.pt    torch.save of {"optimizers": [state dicts], "schedulers": [state dicts],
                        "small_modules": {name: state dict}, "rng": {"python", "torch", "cuda"},
                        "state": loop state}
It is read with torch.load(weights_only=True): tensors and plain containers only, so a pickle that
would run code is refused (`UnsafeCheckpoint`), never run. Its optimizers name parameters by their
position in the groups, matched here with the run's own order, as the layout always did.
Several ranks wrote torch.distributed.checkpoint under `sharded/`, whose metadata is a pickle: that
layout is refused, not unpickled.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ...durable import CorruptDirectory
from ...errors import ModelError
from .parts import Trainables, named_optimizer_state, optimizer_parameters, parameter_names
from .restore import Source, UnsafeCheckpoint, check_parts, mismatch
from .shards import dtype_name, local_chunk

STATE_FILE = "trainer_state.pt"
SHARDED_DIR = "sharded"
_KEYS = {"optimizers", "schedulers", "small_modules", "rng", "state"}


def is_legacy(path: Path) -> bool:
    return (path / STATE_FILE).is_file() or (path / SHARDED_DIR).is_dir()


def open_legacy(path: Path, parts: Trainables) -> Source:
    """The checkpoint at `path` (verified) in the one-process layout of earlier versions. Each model
    directory is read by its part's loader, which for LoRA adapters reads into the run's own
    adapters (they are overwritten by the restore in any case; a mismatch found later stops the
    run)."""
    if (path / SHARDED_DIR).is_dir():
        raise UnsafeCheckpoint(
            f"checkpoint {path} is in the multi-rank layout of earlier fusedrl versions "
            "(torch.distributed.checkpoint, whose metadata is a pickle): not loaded, since "
            "unpickling can run code; start a new run in another output_dir")
    try:
        saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpoint(
            f"{path / STATE_FILE} holds more than tensors and plain data ({first}): not "
            "loaded, since unpickling it could run code") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CorruptDirectory(f"{path / STATE_FILE}: not a readable torch file ({e})") from None
    if not isinstance(saved, dict) or not _KEYS <= saved.keys():
        raise CorruptDirectory(
            f"{path / STATE_FILE}: expected a dict with the keys {sorted(_KEYS)}")
    check_parts(path, parts, sorted(p.name for p in path.iterdir() if p.is_dir()),
                sorted(saved["small_modules"]))
    whole = {}
    for name, model in parts.models.items():
        try:
            state = model.load(path / name).state_dict()
        except ModelError as e:
            raise mismatch(path, f"its {name} does not load into this run's ({e})") from None
        whole.update({f"models.{name}.{k}": v.detach().clone() for k, v in state.items()})
    for name, state in saved["small_modules"].items():
        whole.update({f"modules.{name}.{k}": v for k, v in state.items()})
    if len(saved["optimizers"]) != len(parts.optimizers):
        raise mismatch(path,
                       f"it holds {len(saved['optimizers'])} optimizers, this run "
                       f"{len(parts.optimizers)}")
    names = parameter_names(parts)
    optimizers = [_named_optimizer(path, i, state, optimizer_parameters(optimizer, names), whole)
                  for i, (optimizer,
                          state) in enumerate(zip(parts.optimizers, saved["optimizers"]))]
    rng = saved["rng"]
    rng_tensors = {"rng.torch": rng["torch"],
                   **{f"rng.cuda.{i}": s for i, s in enumerate(rng.get("cuda", []))}}
    version, internal, gauss_next = rng["python"]
    data = {"models": sorted(parts.models), "modules": sorted(saved["small_modules"]),
            "optimizers": optimizers,
            "schedulers": saved["schedulers"], "loop": saved["state"]}
    index = {name: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)}
             for name, t in whole.items()}
    return Source(path, index, lambda name, offsets, sizes: _box(whole[name], offsets, sizes), data,
                  lambda rank: (rng_tensors, [version, list(internal), gauss_next]))


def _named_optimizer(path: Path, i: int, state: dict, groups: list[list[str]], whole: dict) -> dict:
    """Optimizer i's saved state dict in the form of parts.trainer_state, its parameters named by
    the run's (the same order as when it was saved); its tensors go into `whole`."""
    positions = [p for group in state["param_groups"] for p in group["params"]]
    order = [name for group in groups for name in group]
    if len(positions) != len(order):
        raise mismatch(path,
                       f"optimizer {i} trains {len(positions)} parameters there, {len(order)} here")
    return named_optimizer_state(i, state, order, whole)


def _box(tensor: torch.Tensor, offsets: list[int], sizes: list[int]) -> torch.Tensor:
    """The box of `tensor` at `offsets`: a slice of a whole tensor, or the local shard of a model
    the part's loader read sharded (hf_io.load_model(shard=...)) as the run's own model is, box for
    box."""
    local, at = local_chunk(tensor)
    if at == list(offsets) and list(local.shape) == list(sizes):
        return local
    if hasattr(tensor, "to_local"):
        raise ValueError(
            f"the box at {offsets} of size {sizes} is not this rank's shard ({at}, "
            f"{list(local.shape)})")
    return tensor[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
