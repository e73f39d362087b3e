"""The scoring forwards of a rollout (reward model, reference, old log-probs, values) in
micro-batches of at most rollout.tokens_per_forward forwarded tokens: the rollout's one pack is
split into consecutive micro-batches (by index: no second packing), each runs its own forward, and
the outputs are joined back in row order. No forward then holds more than the budget's activations,
whatever the number of rows a rank samples."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ...parallel import distributed
from ...data.packing import PackedBatch, pack


def microbatches(packed: PackedBatch, budget: Optional[int]) -> list[PackedBatch]:
    """The pack's rows, in order, in micro-batches of at most `budget` forwarded tokens (None: the
    pack itself)."""
    if budget is None or packed.forwarded_tokens <= budget:
        return [packed]
    shared = (packed.prefix_groups, packed.prompt_lens)  # a shared prompt counts once
    return [packed.select(rows)
            for rows in pack(packed.seqlens, budget, "tokens_per_forward", shared)]


def _join(outputs: list):
    """Per-micro-batch outputs (a tensor [S_i, ...], or a tuple of tensors or None) -> one, rows in
    order."""
    first = outputs[0]
    if isinstance(first, tuple):
        return tuple(None if field is None else _join([out[k] for out in outputs])
                     for k, field in enumerate(first))
    return first if len(outputs) == 1 else torch.cat(outputs)


def forward_in_microbatches(packed: PackedBatch, budget: Optional[int],
                            forward: Callable[[PackedBatch], object],
                            ranks: distributed.DataRanks = distributed.WORLD):
    """forward(micro) over `packed` cut by `budget` tokens (see microbatches), outputs joined:
    tensors [S, ...] rows first, or tuples of them (None kept). Under torchrun every rank runs as
    many forwards (the rank with most micro-batches sets the count; the others repeat their
    smallest and drop its output), since each forward of a sharded model is a collective; over the
    data `ranks` (PPOModels.ranks)."""
    micros = microbatches(packed, budget)
    # Agreed before the forwards (their collectives).
    most = distributed.max_over_ranks(len(micros), ranks)
    outputs = [forward(micro) for micro in micros]
    smallest = min(micros, key=lambda micro: sum(micro.seqlens))
    distributed.match_forwards(len(micros), most, lambda: forward(smallest))
    return _join(outputs)


def microbatch_rows(seqlens: list[int], rows_per_microbatch: Optional[int],
                    tokens_per_microbatch: Optional[int],
                    shared: tuple[list[int], list[int]] = ([], [])) -> list[list[int]]:
    """A minibatch's rows (of these token counts) split into micro-batches, in order: packed up to
    tokens_per_microbatch forwarded tokens (PPOConfig checks that one row always fits; shared: the
    rows' prefix groups and prompt lengths, a prompt counted once per micro-batch), else
    rows_per_microbatch rows each (None: all at once)."""
    if tokens_per_microbatch is not None:
        return pack(seqlens, tokens_per_microbatch, "tokens_per_microbatch", shared)
    size = rows_per_microbatch or len(seqlens)
    return [list(range(start, min(start + size, len(seqlens))))
            for start in range(0, len(seqlens), size)]


def minibatch_bounds(rows: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of an epoch's minibatches over `rows` rows: ceil(rows / size) of them, their
    sizes as equal as the rows allow (at most `size`, differing by at most one)."""
    count = -(-rows // size)
    return [(i * rows // count, (i + 1) * rows // count) for i in range(count)]
