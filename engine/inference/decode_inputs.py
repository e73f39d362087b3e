"""DecodeInputs: a decode step's inputs in persistent buffers, written on the host and sent in one
copy.

A decode step needs, per row, the last token, its position, the KV slot it writes, the context
length and block table it reads, and the sampling parameters (temperature, top-k, top-p, min-p, seed
and the drawn token's position). Building each from a Python list costs a tensor construction, a
pinned staging buffer and a copy apiece, a dozen per step, which at small batch is most of a step's
host time. Here the rows are written into numpy views (one per dtype) of one pinned host buffer of
bytes, whose used prefix goes to the device in one non-blocking copy. The device buffer's views are
what the decode CUDA graphs read: they never move, so a graph captured on them stays valid.

Rows past the batch (the padding of a graph captured for more rows) get slot -1 (nothing written),
context length 0 (nothing read), block 0 and greedy sampling of token 0.

A decode step may be written before the step it continues is read (engine_loop.py's steps launched
ahead): its rows are then one token past their host tokens, and their input ids are the draws of
the step before, copied on the device (`fill(..., previous=)`). The host buffer is written again
only once its last copy to the device has run (an event on a GPU), for that copy may still wait
behind the step in flight.

A decode step usually runs the sequences of the step before, each one token longer: then only what
moves is written (each row's last token, position, slot, draw position and context length, and the
table of a sequence that took a new page), not the sampling parameters, the other tables or the
padding rows. Anything else (another batch or order, another row count, a sequence that grew by
more than one token or whose table was replaced, the widest table growing: the packed tables'
layout) writes every row again. At batch 256 the full write was most of a decode step's host time
(tests/tools/host_cost.py), time the device waits through between steps.
"""
from __future__ import annotations

import operator
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch

from ...kernels.attention import page_slot, sequence_slot
from .sequence import Sequence

# Rows of the int64 buffer and of the fp32 one. The first four int64 rows are the ones a step one
# token further moves (DecodeInputs._advance writes them as one block).
_I64 = ("input_ids", "positions", "slot_mapping", "draw_positions", "top_ks", "seeds")
_F32 = ("temperatures", "top_ps", "min_ps")
ALIGN = 256  # bytes: where the CUDA caching allocator starts a block


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def _row_length(rows: int, itemsize: int) -> int:
    """Elements from one row of a [fields, rows] view to the next: `rows` rounded up to a whole
    ALIGN, so that every field starts where an allocation of its own would."""
    return _aligned(rows * itemsize) // itemsize


class _Filled(NamedTuple):
    """What a fill wrote, for the next to write only what moved: its sequences, their block-table
    lists (a new list is a new allocation), token counts and table lengths, and rows (the
    full-width tables are copied from the packed ones at every fill)."""
    seqs: list[Sequence]
    tables: list[list[int]]
    lengths: list[int]
    table_lens: list[int]
    size: int


class DecodeInputs:
    """Persistent host and device buffers for decode steps of up to `rows` sequences whose block
    tables hold up to `width` blocks (pages of `block_size` tokens)."""

    def __init__(self, rows: int, width: int, block_size: int, device: torch.device):
        self.rows, self.width, self.block_size = rows, width, block_size
        pin = torch.device(device).type == "cuda"
        # One buffer of bytes on each side, the int64, fp32 and int32 rows views of it at their
        # offsets (int32: context lengths [rows], then the batch's block tables packed as [size, w]
        # from element `_tables_at`, w this step's widest): a step's inputs go in one copy, of the
        # bytes it uses. Each field (a row of the int64 and fp32 views, the context lengths, the
        # tables) starts where an allocation of its own would (ALIGN): the kernels see the
        # alignment they would on separate tensors. Triton compiles a pointer aligned to 16 bytes
        # and one that is not apart, so a field at an odd offset (the second fp32 row at rows = 50)
        # would cost a compile of each kernel reading it that no other engine size needs.
        self._i64_row, self._f32_row = _row_length(rows, 8), _row_length(rows, 4)
        self._tables_at = _row_length(rows, 4)
        self._f32_start = 8 * len(_I64) * self._i64_row
        self._i32_start = self._f32_start + 4 * len(_F32) * self._f32_row
        nbytes = self._i32_start + 4 * (self._tables_at + rows * width)
        self._host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin)
        self._device = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._i64, self._f32, self._i32 = (t.numpy() for t in self._views(self._host))
        self.i64, self.f32, self.i32 = self._views(self._device)
        # The block tables at full width, what a graph reads (its shape cannot follow the step's
        # width).
        self.block_tables = torch.zeros(rows, width, dtype=torch.int32, device=device)
        # what a graph's warm-up and capture run on: no writes
        self._i64[_I64.index("slot_mapping")] = -1
        self._device.copy_(self._host)
        self.table_width = 0
        self._last: _Filled | None = None
        # On a GPU: recorded after each copy of the host buffer to the device; the next fill waits
        # for it before writing the host buffer again.
        self._sent = None

    def _views(self, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The int64 [6, rows], fp32 [3, rows] and int32 [_tables_at + rows * width] views of a
        byte buffer laid out as __init__ says."""
        i64 = buffer[:self._f32_start].view(torch.int64).view(len(_I64), self._i64_row)
        f32 = buffer[self._f32_start:self._i32_start].view(torch.float32)
        return (i64[:, :self.rows], f32.view(len(_F32), self._f32_row)[:, :self.rows],
                buffer[self._i32_start:].view(torch.int32))

    def fill(self, seqs: list[Sequence], size: int, full_tables: bool,
             previous: torch.Tensor | None = None) -> None:
        """Write the decode inputs of `seqs` (each at its last token) into rows [0, len(seqs)), pad
        rows up to `size`, and send them to the device. full_tables: also lay the block tables out
        at full width in `block_tables` (for a graph; one device copy). A position is the token's
        index plus its sequence's M-RoPE decode offset (0 for text: sequence.py's rope_delta).
        previous: the device draws [>= len(seqs)] of a step of these rows not yet read: each row is
        one token further, that draw its input (its slot must be held: append_slots(ahead=1))."""
        b = len(seqs)
        if not b <= size <= self.rows:
            raise ValueError(f"decode batch of {b} sequences in {size} rows: expected "
                             f"{b} <= size <= {self.rows} (max_num_seqs)")
        if self._sent is not None:  # the last copy of the host buffer has run
            self._sent.synchronize()
        tables = [s.block_table for s in seqs]
        ahead = previous is not None
        lengths = [len(s.token_ids) + ahead for s in seqs]
        # the input ids the host knows (a row ahead: a stand-in, replaced on the device below)
        last_ids = [0] * b if ahead else [s.token_ids[-1] for s in seqs]
        filled = _Filled(list(seqs), tables, lengths, list(map(len, tables)), size)
        if not self._advance(filled, last_ids):
            self._last = None  # until the rows are all written
            self._write(seqs, size, lengths, last_ids)
        self._last = filled
        # Non-blocking: the next fill waits for it (`_sent`) before writing the host buffer again.
        w = self.table_width
        end = self._tables_at + size * w
        used = self._i32_start + 4 * end
        self._device[:used].copy_(self._host[:used], non_blocking=True)
        if self._device.is_cuda:  # on the stream of the buffer's device, where the copy runs
            self._sent = torch.cuda.Event()
            self._sent.record(torch.cuda.current_stream(self._device.device))
        if ahead:
            self.i64[0, :b].copy_(previous[:b])
        if full_tables:
            self.block_tables[:size, :w] = self.i32[self._tables_at:end].view(size, w)

    def forget(self) -> None:
        """Drop what the last fill wrote (its sequences are released): the next fill writes every
        row."""
        self._last = None

    def _advance(self, now: "_Filled", last_ids: list[int]) -> bool:
        """The last fill's rows moved on by one token each, when that is what `now` is (the same
        sequences in the same order and rows, each one token longer, their tables the same lists,
        none wider than the packed width): True, else nothing written.

        Between two decode steps a table only grows at its end (BlockManager.append_slot), or is a
        new list (allocate after a preemption or a release): a page changed in place (trim's
        rollback of a draft, then reserve or append_slot) follows a verify step, which moves its
        sequence two or more tokens, so a table of unchanged length is unchanged."""
        last, w = self._last, self.table_width
        if (last is None or now.size != last.size or len(now.seqs) != len(last.seqs)
                or not all(map(operator.is_, now.seqs, last.seqs))
                or not all(map(operator.is_, now.tables, last.tables))
                or now.lengths != [n + 1 for n in last.lengths] or max(now.table_lens) > w):
            return False
        b, bs = len(now.seqs), self.block_size
        packed = self._i32[self._tables_at:self._tables_at + now.size * w]
        if now.table_lens != last.table_lens:  # a sequence took a new page: its row again
            for r, (n, m) in enumerate(zip(now.table_lens, last.table_lens)):
                if n != m:
                    packed[r * w:r * w + n] = now.tables[r]
        # The four rows that move (input_ids, positions, slot_mapping, draw_positions) in one
        # write: per row a few Python ints (numpy's per-call cost would outweigh them below
        # about 64 rows).
        positions = [n - 1 + s.rope_delta for n, s in zip(now.lengths, now.seqs)]
        slots = [page_slot(t[(n - 1) // bs], n - 1, bs) for t, n in zip(now.tables, now.lengths)]
        self._i64[:4, :b] = [last_ids, positions, slots, now.lengths]
        self._i32[:b] = now.lengths  # the context length: num_tokens
        return True

    def _write(self, seqs: list[Sequence], size: int, lengths: list[int],
               last_ids: list[int]) -> None:
        """Every row of `seqs` (of `lengths` tokens, the last `last_ids`) and the padding up to
        `size` written (see fill)."""
        b = len(seqs)
        i64, f32, i32, block_size = self._i64, self._f32, self._i32, self.block_size
        # One pass over the rows into flat lists (a row's fields read once: at batch 256 this loop
        # is most of a step's host time), then one numpy write per buffer.
        ints, floats, tables = [], [], []
        for s, n, token in zip(seqs, lengths, last_ids):
            p, table = s.request.params, s.block_table
            last = n - 1
            ints += (token, last + s.rope_delta, sequence_slot(table, last, block_size),
                     n, p.top_k, s.seed)
            floats += (p.temperature, p.top_p, p.min_p)
            tables.append(table)
        i64[:, :b] = np.array(ints, dtype=np.int64).reshape(b, len(_I64)).T
        f32[:, :b] = np.array(floats, dtype=np.float32).reshape(b, len(_F32)).T
        i32[:b] = i64[_I64.index("draw_positions"), :b]  # the context length: num_tokens
        w = max(map(len, tables))
        packed = i32[self._tables_at:self._tables_at + size * w].reshape(size, w)
        packed[:] = 0
        for r, table in enumerate(tables):
            packed[r, :len(table)] = table
        i64[:, b:size] = 0
        i64[_I64.index("slot_mapping"), b:size] = -1
        f32[:, b:size] = 0.0
        i32[b:size] = 0
        self.table_width = w

    def views(self, size: int, full_tables: bool) -> SimpleNamespace:
        """The device tensors of rows [0, size): input_ids, positions, slot_mapping [size] int64,
        context_lens [size] int32, block_tables [size, width or the last fill's w] int32, and
        `sampling`, the sampler's (temperatures, top_ks, top_ps, seeds, draw positions, min_ps)."""
        x = {name: self.i64[i, :size] for i, name in enumerate(_I64)}
        x.update({name: self.f32[i, :size] for i, name in enumerate(_F32)})
        w = self.table_width
        tables = (self.block_tables[:size] if full_tables
                  else self.i32[self._tables_at:self._tables_at + size * w].view(size, w))
        return SimpleNamespace(input_ids=x["input_ids"], positions=x["positions"],
                               slot_mapping=x["slot_mapping"], context_lens=self.i32[:size],
                               block_tables=tables,
                               sampling=(x["temperatures"], x["top_ks"], x["top_ps"], x["seeds"],
                                         x["draw_positions"], x["min_ps"]))

