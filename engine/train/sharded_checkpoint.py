"""The sharded form of the one checkpoint format (engine/train/checkpoint.py), written when a run has
more than one rank, through torch.distributed.checkpoint (DCP).

Layout of a sharded `RUN_DIR/checkpoints/step-00000012/`:
    sharded/            DCP: every model's and small module's parameters and every optimizer's state
                        (fp32 masters and moments included), each rank writing its own shards, keyed
                        by parameter name, so any number of ranks (one process without torchrun
                        included) loads it, resharding on load
    trainer_state.pt    written by rank 0: the schedulers, rank 0's RNG states and the loop state
    rng-rank-R.pt       the RNG states of rank R (a rank with no file of its own takes rank 0's)
The temp-dir-then-rename protocol of checkpoint.py applies unchanged: rank 0 creates and renames the
directory, every rank writes into it in between.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import distributed

SHARDED = "sharded"
STATE_FILE = "trainer_state.pt"


def is_sharded(path) -> bool:
    return (Path(path) / SHARDED).is_dir()


def _holder(parts) -> nn.ModuleDict:
    """All trained modules under their checkpoint names: parameter names such as
    `policy.model.layers.0.mlp.up_proj.weight` identify each tensor across world sizes."""
    return nn.ModuleDict({**{name: m.module for name, m in parts.models.items()}, **parts.small_modules})


def _state(parts, holder: nn.ModuleDict) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return {"model": get_model_state_dict(holder),
            "optimizers": {str(i): get_optimizer_state_dict(holder, o) for i, o in enumerate(parts.optimizers)}}


def save_sharded(directory: Path, parts, loop_state: dict, rng: dict) -> None:
    """Write `parts` (a checkpoint.Trainables) into `directory` (collective: every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(parts, _holder(parts)), checkpoint_id=str(directory / SHARDED))
    torch.save(rng, directory / f"rng-rank-{distributed.rank()}.pt")
    if distributed.is_main():
        torch.save({"schedulers": [s.state_dict() for s in parts.schedulers], "rng": rng, "state": loop_state},
                   directory / STATE_FILE)


def load_sharded(path: Path, parts) -> tuple[dict, dict]:
    """Restore `parts` from a sharded checkpoint written by any number of ranks (collective);
    returns (loop state, this rank's RNG states)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    holder = _holder(parts)
    state = _state(parts, holder)
    dcp.load(state, checkpoint_id=str(path / SHARDED))
    set_model_state_dict(holder, state["model"])
    for i, optimizer in enumerate(parts.optimizers):
        set_optimizer_state_dict(holder, optimizer, state["optimizers"][str(i)])
    # Our own files; weights_only=False because the python RNG state and scheduler dicts are not tensors.
    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    for scheduler, sched_state in zip(parts.schedulers, saved["schedulers"], strict=True):
        scheduler.load_state_dict(sched_state)
    own = path / f"rng-rank-{distributed.rank()}.pt"
    rng = torch.load(own, weights_only=False) if own.exists() else saved["rng"]
    return saved["state"], rng
