"""Where a token's keys and values live in the paged KV cache: the one formula that the engine's
writers (the runner's slot mapping) and the attention paths that read the pages (prefill over cached
pages, the torch decode path, the exact mode's page tables) share.

A cache of one layer is `[num_blocks, block_size, Hkv, D]`; flattened to `[num_blocks * block_size,
Hkv, D]`, position p of a sequence is row `block * block_size + p % block_size`, where `block` is
the entry `p // block_size` of the sequence's block table.
"""
from __future__ import annotations

import torch


def page_slot(block, position, block_size: int):
    """The flattened cache row holding `position`, given the `block` its page maps to; ints or int64
    tensors of one shape (`position` 0 gives the row where the page starts)."""
    return block * block_size + position % block_size


def sequence_slot(block_table: list[int], position: int, block_size: int) -> int:
    """The flattened cache row of `position` of a sequence whose pages are `block_table` (host
    ints)."""
    return page_slot(block_table[position // block_size], position, block_size)


def key_slots(block_tables: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor,
              block_size: int) -> torch.Tensor:
    """Rows of the keys at `positions` of the sequences `seq_ids` (int64, broadcast to one shape),
    read through `block_tables` [S, W] (int32 block ids, -1 past a table's end) -> int64 slots."""
    return page_slot(block_tables[seq_ids, positions // block_size].long(), positions, block_size)
