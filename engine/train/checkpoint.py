"""Training checkpoints: everything needed to continue a run exactly where it stopped.

Layout of `RUN_DIR/checkpoints/step-00000012/`:
    model/              the weights as a Hugging Face directory (engine.checkpoint.save_model, or
                        save_reward_model for the RM)
    trainer_state.pt    optimizer and scheduler state dicts, RNG states (python, torch CPU, CUDA),
                        and the TrainState (step, epoch, micro-batches of that epoch consumed)
The directory is first written as a hidden `.step-...tmp-*` sibling and renamed when complete, so a
crash mid-save leaves no `step-*` directory at all: `latest_checkpoint` never sees half a checkpoint.
"""
from __future__ import annotations

import dataclasses
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"
PREFIX = "step-"


@dataclass
class TrainState:
    step: int = 0          # optimizer steps done
    epoch: int = 0         # epoch the next micro-batch comes from
    batch_index: int = 0   # micro-batches of that epoch already consumed
    tokens: int = 0        # training tokens seen (for the log)


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


def save_atomically(run_dir, step: int, write, keep: int = 0) -> Path:
    """Write checkpoint `step` with write(directory) into a hidden temp sibling, then rename it into
    place; keep the newest `keep` checkpoints (0 = all). Shared by every stage's checkpoint."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        if final.exists():  # the same step saved again (e.g. a final save right after a periodic one)
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def save_checkpoint(run_dir, state: TrainState, model, save_weights, optimizer, scheduler, keep: int = 0) -> Path:
    """Write a complete checkpoint of `state.step` atomically; keep the newest `keep` (0 = all).

    save_weights(model, directory) writes the model directory (save_model or save_reward_model).
    """
    def write(tmp: Path):
        save_weights(model, tmp / "model")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), "state": dataclasses.asdict(state)}, tmp / STATE_FILE)
    return save_atomically(run_dir, state.step, write, keep)


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints, oldest first (hidden temp dirs of interrupted saves are not listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path, model, load_weights, optimizer, scheduler) -> TrainState:
    """Restore model weights, optimizer, scheduler and RNG states from `path`; return its TrainState.

    load_weights(directory) -> a model whose state dict is copied into `model`.
    """
    path = Path(path)
    # Our own file; weights_only=False because the python RNG state and scheduler dict are not tensors.
    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    with torch.no_grad():
        model.load_state_dict(load_weights(path / "model").state_dict())
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"])
    return TrainState(**saved["state"])
