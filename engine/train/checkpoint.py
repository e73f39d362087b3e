"""Training checkpoints, one format for every stage: everything needed to continue a run exactly.

Layout of `RUN_DIR/checkpoints/step-00000012/`:
    <name>/             each trained model as a Hugging Face directory, under the name the stage
                        gives it (SFT `model`, RM `model`, PPO `policy` and `critic`)
    trainer_state.pt    the optimizers' and schedulers' state dicts (in the stage's order), small
                        modules saved by state dict (e.g. PPO's shared value head), RNG states
                        (python, torch CPU, CUDA) and the stage's loop state (a dict)
    manifest.json       every file's size and sha256, written last (engine/durable.py)
The directory is first written as a hidden `.step-...tmp-*` sibling and renamed when complete, so a
crash mid-save leaves no `step-*` directory at all: `latest_checkpoint` never sees half a checkpoint
(and `run_training` removes such leftovers when a run starts). Nothing non-finite is written. A
resume verifies the newest checkpoint against its manifest; a corrupt one is renamed `corrupt-step-*`
(kept for inspection, never loaded again) and the previous one is used, with a warning.
A run with several ranks (torchrun) writes the sharded form instead (engine/train/sharded_checkpoint.py),
under the same protocol: rank 0 creates the temp directory, writes the manifest and renames it.
"""
from __future__ import annotations

import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..durable import CorruptDirectory, check_finite, publish, temp_dir, verify_manifest, write_manifest
from ..errors import NonFiniteError
from .. import distributed
from .sharded_checkpoint import STATE_FILE, is_sharded, load_sharded, load_whole_into_sharded, save_sharded

PREFIX = "step-"
_NAME = re.compile(rf"{PREFIX}\d{{8}}")
CORRUPT_PREFIX = "corrupt-"


@dataclass
class SavedModel:
    """A model written as its own directory: save(module, directory), load(directory) -> module
    whose state dict is copied into `module` on resume."""
    module: nn.Module
    save: Callable[[nn.Module, Path], None]
    load: Callable[[Path], nn.Module]


@dataclass
class Trainables:
    """What a stage's checkpoint holds besides its loop state."""
    models: dict[str, SavedModel]
    optimizers: list[torch.optim.Optimizer]
    schedulers: list
    small_modules: dict[str, nn.Module] = field(default_factory=dict)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:08d}"


def save_checkpoint(run_dir, step: int, parts: Trainables, loop_state: dict, keep: int = 0) -> Path:
    """Write checkpoint `step` into a hidden temp sibling, then rename it into place; keep the
    newest `keep` checkpoints (0 = all). With several ranks (collective: every rank calls it) the
    checkpoint is sharded (engine/train/sharded_checkpoint.py); rank 0 creates, seals and renames it."""
    final = checkpoint_dir(run_dir, step)
    sharded = distributed.world_size() > 1
    # Models are checked by their own save (each rank its shards when sharded); the rest here,
    # before the first byte is written, on every rank alike.
    _check_finite_everywhere(_state_tensors(parts, with_models=sharded), f"checkpoint {final}")
    tmp = None
    if distributed.is_main():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(final)
    tmp = distributed.broadcast(tmp)
    try:
        if sharded:
            save_sharded(tmp, parts, loop_state, rng_state())
        else:
            for name, model in parts.models.items():
                model.save(model.module, tmp / name)
            torch.save({"optimizers": [o.state_dict() for o in parts.optimizers],
                        "schedulers": [s.state_dict() for s in parts.schedulers],
                        "small_modules": {k: m.state_dict() for k, m in parts.small_modules.items()},
                        "rng": rng_state(), "state": loop_state}, tmp / STATE_FILE)
        distributed.barrier()  # every rank's shards are written before the manifest seals them
        if distributed.is_main():
            write_manifest(tmp)
            publish(tmp)
            if final.exists():  # the same step saved again (e.g. a final save right after a periodic one)
                shutil.rmtree(final)
            tmp.rename(final)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep and distributed.is_main():
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    distributed.barrier()  # no rank reads the run directory before it is complete
    return final


def _check_finite_everywhere(named_tensors, what: str) -> None:
    """check_finite on this rank's tensors (local shards), raised on every rank if any rank fails,
    so no rank is left waiting in the save's collectives."""
    try:
        check_finite(((name, _local(t)) for name, t in named_tensors), what)
        problem = None
    except NonFiniteError as e:
        problem = str(e)
    if distributed.world_size() > 1:
        problem = next((p for p in distributed.all_gather(problem) if p), None)
    if problem:
        raise NonFiniteError(problem)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter or state's own shard; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _state_tensors(parts: Trainables, with_models: bool = False):
    """(name, tensor) of everything trainer_state.pt holds besides RNG states (and, with_models,
    the models' parameters, which their own save checks in the one-process form)."""
    if with_models:
        for name, model in parts.models.items():
            yield from ((f"{name}.{k}", v) for k, v in model.module.state_dict().items())
    for i, optimizer in enumerate(parts.optimizers):
        for key, state in optimizer.state_dict()["state"].items():
            yield from ((f"optimizer {i} state {key}.{k}", v) for k, v in state.items()
                        if isinstance(v, torch.Tensor))
    for name, module in parts.small_modules.items():
        yield from ((f"{name}.{k}", v) for k, v in module.state_dict().items())


def load_checkpoint(path, parts: Trainables) -> dict:
    """Verify checkpoint `path` (CorruptDirectory if it fails), restore every part from it and the
    RNG states; return the loop state. Either form loads onto any number of ranks (a one-process
    checkpoint into sharded models too; collective then)."""
    path = Path(path)
    verify_manifest(path)
    if is_sharded(path):
        loop_state, rng = load_sharded(path, parts)
        set_rng_state(rng)
        return loop_state
    # Our own file; weights_only=False because the python RNG state and scheduler dicts are not tensors.
    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if distributed.world_size() > 1:
        load_whole_into_sharded(path, parts, saved)
    else:
        with torch.no_grad():
            for name, model in parts.models.items():
                model.module.load_state_dict(model.load(path / name).state_dict())
            for name, module in parts.small_modules.items():
                module.load_state_dict(saved["small_modules"][name])
        for optimizer, state in zip(parts.optimizers, saved["optimizers"], strict=True):
            optimizer.load_state_dict(state)
    for scheduler, state in zip(parts.schedulers, saved["schedulers"], strict=True):
        scheduler.load_state_dict(state)
    set_rng_state(saved["rng"])
    return saved["state"]


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints, oldest first (hidden temp dirs of interrupted saves are not listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))


def latest_checkpoint(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resume(run_dir, parts: Trainables) -> tuple[Path | None, dict]:
    """Load the newest checkpoint that verifies; (its path, loop state), or (None, {}) when none.
    A corrupt one is set aside as `corrupt-step-*` with a warning on stderr, and the previous tried.
    With several ranks every rank verifies the same files (so all agree) and rank 0 sets it aside."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, parts)
        except CorruptDirectory as e:
            distributed.barrier()  # every rank is done reading it
            if not distributed.is_main():
                continue
            aside = path.with_name(CORRUPT_PREFIX + path.name)
            shutil.rmtree(aside, ignore_errors=True)  # an older copy of the same step set aside before
            path.rename(aside)
            print(f"fusedrl: warning: checkpoint {path.name} is corrupt ({e}); moved to {aside.name}, "
                  "trying the previous one", file=sys.stderr)
    return None, {}
