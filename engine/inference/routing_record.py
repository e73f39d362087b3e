"""The experts a run's forwards chose for every token of every sequence (routing replay: the
trainer's forwards of an MoE policy then route each token as the sampler did), whatever the step
that forwarded it: a prefill, a prompt's chunk, a decode step or a speculative verify step
(LLM.step records every kind in one place).

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
        """Start a run: rows of the last one are dropped."""
        self.kept = 0
        self.slot_rows.clear()

    def keep(self, spans: list[tuple[Sequence, int, int]], chosen: torch.Tensor) -> None:
        """Append one forward's choices [sparse layers, n, k] (n >= its tokens: a graph's padding
        rows are dropped) and give each forwarded position its row: spans (sequence, start, end)
        in the forward's order, positions [start, end) of that sequence (a prefill's new tokens, a
        decode's last one, a verify step's last one and its draft). Positions before `start`
        without a row take the row of the block slot that holds their K/V (a shared prefix, a
        chunk forwarded earlier)."""
        row = self.kept
        for seq, start, end in spans:
            have = min(len(seq.routing_rows), start)
            del seq.routing_rows[have:]
            seq.routing_rows += [self._slot_row(seq, p) for p in range(have, start)]
            for p in range(start, end):
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
