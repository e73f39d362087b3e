"""The scoring forwards of a rollout (reward model, reference, old log-probs, values) cut by a token
budget, rollout.tokens_per_forward: the rollout's one pack is split into consecutive pieces of at
most that many tokens (by index: no second packing), each piece runs its own forward, and the
outputs are joined back in row order. No forward then holds more than the budget's activations,
whatever the number of rows a rank samples."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ...parallel import distributed
from ...data.packing import PackedBatch, pack


def pieces(packed: PackedBatch, budget: Optional[int]) -> list[PackedBatch]:
    """The pack's rows, in order, in pieces of at most `budget` forwarded tokens (None: the pack
    itself)."""
    if budget is None or packed.forwarded_tokens <= budget:
        return [packed]
    shared = (packed.prefix_groups, packed.prompt_lens)  # a shared prompt counts once
    return [packed.select(rows)
            for rows in pack(packed.seqlens, budget, "tokens_per_forward", shared)]


def _join(outputs: list):
    """Per-piece outputs (a tensor [S_i, ...], or a tuple of tensors or None) -> one, rows in
    order."""
    first = outputs[0]
    if isinstance(first, tuple):
        return tuple(None if part is None else _join([out[k] for out in outputs])
                     for k, part in enumerate(first))
    return first if len(outputs) == 1 else torch.cat(outputs)


def forward_in_pieces(packed: PackedBatch, budget: Optional[int],
                      forward: Callable[[PackedBatch], object],
                      ranks: distributed.DataRanks = distributed.WORLD):
    """forward(piece) over `packed` cut by `budget` tokens (see pieces), outputs joined: tensors
    [S, ...] rows first, or tuples of them (None kept). Under torchrun every rank runs as many
    forwards (the rank with most pieces sets the count; the others repeat their smallest piece and
    drop its output), since each forward of a sharded model is a collective; over the data `ranks`
    (PPOModels.ranks)."""
    parts = pieces(packed, budget)
    # Agreed before the forwards (their collectives).
    most = distributed.max_over_ranks(len(parts), ranks)
    outputs = [forward(part) for part in parts]
    smallest = min(parts, key=lambda part: sum(part.seqlens))
    distributed.match_forwards(len(parts), most, lambda: forward(smallest))
    return _join(outputs)
