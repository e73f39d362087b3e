"""The experts a generate call's forwards chose for every token of every sequence (routing replay:
the trainer's forwards of an MoE policy then route each token as the sampler did).

Each step's choices [sparse layers, n, k] are appended to one device buffer (int16 rows of
[sparse layers, k], grown by doubling; no host read), and every sequence keeps, per position, the
row that holds its token's choices (`Sequence.routing_rows`, -1 for none yet). A prompt token
whose K/V came from a shared block was computed by another sequence: its row is the one recorded
for that block slot. A sampled token is only forwarded at the next step, so a finished
sequence's last token has no row (nothing depends on its routing).
"""
from __future__ import annotations

import torch

from ..model.moe import moe_blocks
from .sequence import Sequence


class RoutingRecorder:
    """Routing records of one model's forwards in a paged engine of `block_size` tokens a block."""

    def __init__(self, model, block_size: int, device):
        blocks = moe_blocks(model)
        if not blocks:
            raise ValueError(
                "routing replay needs a mixture-of-experts model; this one has no sparse layer")
        self.num_layers, self.top_k = len(blocks), blocks[0].moe.top_k
        self.block_size = block_size
        self.buffer = torch.empty(1024, self.num_layers, self.top_k, dtype=torch.int16,
                                  device=device)
        self.kept = 0
        self.slot_rows: dict[tuple[int, int], int] = {}  # (block, offset) -> row of the token there

    def reset(self) -> None:
        """Start a generate call: rows of the last one are dropped."""
        self.kept = 0
        self.slot_rows.clear()

    def keep(self, seqs: list[Sequence], is_prefill: bool, chosen: torch.Tensor) -> None:
        """Append a step's choices [sparse layers, n, k] (n >= the step's tokens: a graph's padding
        rows are dropped) and give each forwarded position of `seqs` its row."""
        row = self.kept
        for seq in seqs:
            if is_prefill:
                # cached prompt tokens: the rows of the blocks that hold them
                start = seq.num_cached_tokens
                seq.routing_rows = [self._slot_row(seq, p) for p in range(start)]
                positions = range(start, seq.num_tokens)
            else:
                positions = range(seq.num_tokens - 1, seq.num_tokens)
            for p in positions:
                del seq.routing_rows[p:]
                seq.routing_rows.append(row)
                self.slot_rows[self._slot(seq, p)] = row
                row += 1
        n = row - self.kept
        if row > self.buffer.shape[0]:
            grown = self.buffer.new_empty(max(2 * self.buffer.shape[0], row),
                                          *self.buffer.shape[1:])
            grown[:self.kept].copy_(self.buffer[:self.kept])
            self.buffer = grown
        self.buffer[self.kept:row].copy_(chosen[:, :n].transpose(0, 1))
        self.kept = row

    def gather(self, rows: list[int]) -> torch.Tensor:
        """The records at these rows [len(rows), sparse layers, k] int16, -1 where a row is -1."""
        index = torch.tensor(rows, dtype=torch.int64).to(self.buffer.device, non_blocking=True)
        picked = self.buffer.index_select(0, index.clamp(min=0))
        return torch.where((index >= 0)[:, None, None], picked, torch.full_like(picked, -1))

    def _slot(self, seq: Sequence, position: int) -> tuple[int, int]:
        return seq.block_table[position // self.block_size], position % self.block_size

    def _slot_row(self, seq: Sequence, position: int) -> int:
        return self.slot_rows.get(self._slot(seq, position), -1)
