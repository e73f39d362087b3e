"""The sharded form of the one checkpoint format (engine/train/checkpoint.py), written when a run has
more than one rank, through torch.distributed.checkpoint (DCP).

Layout of a sharded `RUN_DIR/checkpoints/step-00000012/`:
    sharded/            DCP: every model's and small module's parameters and every optimizer's state
                        (fp32 masters and moments included), each rank writing its own shards, keyed
                        by parameter name, so any number of ranks (one process without torchrun
                        included) loads it, resharding on load
    trainer_state.pt    written by rank 0: the schedulers, rank 0's RNG states and the loop state
    rng-rank-R.pt       the RNG states of rank R (a rank with no file of its own takes rank 0's)
A one-process checkpoint loads into sharded models too (`load_whole_into_sharded`), so a run can
move from one process to several ranks as well as back.
The temp-dir-then-rename protocol of checkpoint.py applies unchanged: rank 0 creates and renames the
directory, every rank writes into it in between.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import distributed

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


def load_whole_into_sharded(path: Path, parts, saved: dict) -> None:
    """Restore the models, small modules and optimizers of a one-process checkpoint (`saved`: its
    trainer_state.pt) into sharded `parts`: every rank reads the whole tensors and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    whole = StateDictOptions(full_state_dict=True)
    holder = _holder(parts)
    weights = {f"{name}.{key}": value for name, m in parts.models.items()
               for key, value in m.load(path / name).state_dict().items()}
    weights.update({f"{name}.{key}": value for name, state in saved["small_modules"].items()
                    for key, value in state.items()})
    set_model_state_dict(holder, weights, options=whole)
    names = {param: name for name, param in holder.named_parameters()}
    for optimizer, state in zip(parts.optimizers, saved["optimizers"], strict=True):
        # optimizer.state_dict() names parameters by position in its groups; DCP by parameter name.
        positions = [i for group in state["param_groups"] for i in group["params"]]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        name_of = {i: names[p] for i, p in zip(positions, params, strict=True)}
        by_name = {"state": {name_of[i]: s for i, s in state["state"].items()},
                   "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(holder, optimizer, by_name, options=whole)
