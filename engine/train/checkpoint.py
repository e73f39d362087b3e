"""Training checkpoints, one format for every stage: everything needed to continue a run exactly.

Layout of `RUN_DIR/checkpoints/step-00000012/`:
    <name>/             each trained model as a Hugging Face directory, under the name the stage
                        gives it (SFT `model`, RM `model`, PPO `policy` and `critic`)
    trainer_state.pt    the optimizers' and schedulers' state dicts (in the stage's order), small
                        modules saved by state dict (e.g. PPO's shared value head), RNG states
                        (python, torch CPU, CUDA) and the stage's loop state (a dict)
The directory is first written as a hidden `.step-...tmp-*` sibling and renamed when complete, so a
crash mid-save leaves no `step-*` directory at all: `latest_checkpoint` never sees half a checkpoint.
A run with several ranks (torchrun) writes the sharded form instead: engine/train/sharded_checkpoint.py.
"""
from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import distributed
from .sharded_checkpoint import STATE_FILE, is_sharded, load_sharded, load_whole_into_sharded, save_sharded

PREFIX = "step-"


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
    checkpoint is sharded (engine/train/sharded_checkpoint.py) and rank 0 creates and renames it."""
    final = checkpoint_dir(run_dir, step)
    tmp = None
    if distributed.is_main():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp = distributed.broadcast(tmp)
    try:
        if distributed.world_size() > 1:
            save_sharded(tmp, parts, loop_state, rng_state())
        else:
            for name, model in parts.models.items():
                model.save(model.module, tmp / name)
            torch.save({"optimizers": [o.state_dict() for o in parts.optimizers],
                        "schedulers": [s.state_dict() for s in parts.schedulers],
                        "small_modules": {k: m.state_dict() for k, m in parts.small_modules.items()},
                        "rng": rng_state(), "state": loop_state}, tmp / STATE_FILE)
        distributed.barrier()  # every rank's shards are written before the rename
        if distributed.is_main():
            if final.exists():  # the same step saved again (e.g. a final save right after a periodic one)
                shutil.rmtree(final)
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep and distributed.is_main():
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    distributed.barrier()  # no rank reads the run directory before it is complete
    return final


def load_checkpoint(path, parts: Trainables) -> dict:
    """Restore every part from checkpoint `path`, and the RNG states; return the loop state.
    Either form loads onto any number of ranks (a one-process checkpoint into sharded models too)."""
    path = Path(path)
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
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None
