"""The FSDP2 units of a sharded model as the layers that read its weights see them: gathered for
a while (`gathered`), back to their shards (`reshard`), a DTensor's whole value (`whole_value`).
No-ops on a model that is not sharded; the sharding itself is the parallel layout's
(engine/parallel/distributed.py)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


def fsdp_units(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(*models: nn.Module) -> Iterator[None]:
    """Inside: every FSDP unit of `models` holds its unsharded parameters (whole, or tensor slices)
    and no forward reshards them, so a rank can run any number of forwards with no collective
    (generation of its own share of prompts), at the cost of those unsharded parameters while
    inside. Collective on entry and exit. No-op for an unsharded model."""
    units = [u for m in models for u in fsdp_units(m)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            # FSDP's own defaults: a root unit keeps its parameters after forward (backward
            # needs them next), every other unit reshards.
            unit.set_reshard_after_forward(not any(unit is m for m in models), recurse=False)


def reshard(*models: nn.Module) -> None:
    """Every FSDP unit of `models` back to its shards (a root unit stays gathered after a forward
    without backward): its parameters then are the DTensors that hold the values. No-op
    unsharded."""
    for model in models:
        for unit in fsdp_units(model):
            unit.reshard()


def whole_value(x):
    """A DTensor's whole value (collective), anything else as is."""
    from torch.distributed.tensor import DTensor
    return x.full_tensor() if isinstance(x, DTensor) else x
