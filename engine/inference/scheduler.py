"""Scheduler: continuous batching over waiting and running sequences (pure Python).

Each step is either a prefill of newly admitted sequences (admitted while blocks and the token
budget last, oldest first) or a decode of every running sequence. When a running sequence needs a
block and none is free, the most recently admitted one is preempted: its blocks are freed and it
goes back to the front of the queue, to be recomputed (prompt + tokens so far) when blocks free up.

Sequences that pause (`seq.pauses`: a run with an on_end hook, engine_loop.py; multi-turn
trajectories, multi_turn.py) pause at the end of a turn with their blocks kept; `resume` appends
the next turn's prompt tokens and queues them for a prefill of those tokens only.
"""
from __future__ import annotations

from collections import deque
from enum import Enum

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


class StepKind(Enum):
    """What one engine step runs: the scheduler says which of the first three; the loop makes a
    DECODE of the tail a VERIFY where its rows have drafts (ngram_draft.Drafts)."""
    PREFILL = "prefill"  # admitted sequences' new tokens, then a draw each
    CHUNK = "chunk"  # a long prompt's chunk that is not its last: K/V written, nothing drawn
    DECODE = "decode"  # every running sequence's next token (a CUDA graph where captured)
    VERIFY = "verify"  # the decode tail's n-gram drafts checked in one forward (speculative)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: tuple[int, ...],
                 prefill_chunk: int | None = None):
        """prefill_chunk: a sequence with more new tokens than this is prefilled alone, a chunk a
        step (Sequence.chunk_end), its chunks taking turns with the running sequences' decode steps
        (vLLM's chunked prefill): no prefill forward holds more than a chunk's activations."""
        self.prefill_chunk = prefill_chunk
        self.prefilling: Sequence | None = None  # the sequence whose chunks are under way
        self._decode_turn = False
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running and self.prefilling is None

    def schedule(self) -> tuple[list[Sequence], StepKind]:
        """The sequences of the next step and its kind: PREFILL, a prompt's CHUNK that is not its
        last, or DECODE (an empty batch: nothing can run)."""
        if self.prefilling is not None:
            self._decode_turn = not self._decode_turn
            batch = self._decode_batch() if self._decode_turn and self.running else []
            if batch:
                return batch, StepKind.DECODE
            return _prefill_kind([self._next_chunk()])
        batch = self._admit()
        if batch:
            return _prefill_kind(batch)
        return self._decode_batch(), StepKind.DECODE

    def _chunked(self, seq: Sequence) -> bool:
        return self.prefill_chunk is not None and seq.num_tokens > self.prefill_chunk

    def _next_chunk(self) -> Sequence:
        """The prefilling sequence with its next chunk's end set; on its last chunk it joins the
        running sequences (that step samples its first token)."""
        seq = self.prefilling
        seq.chunk_end = min(seq.num_cached_tokens + self.prefill_chunk, seq.num_tokens)
        if seq.chunk_end == seq.num_tokens:
            self.prefilling, seq.chunk_end = None, None
            self.running.append(seq)
        return seq

    def chunk_done(self, seq: Sequence) -> None:
        """A chunk of `seq` is in the KV pool: the next one starts after it."""
        seq.num_cached_tokens = seq.chunk_end

    def _admit(self) -> list[Sequence]:
        batch, num_tokens = [], 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # A lone sequence longer than the budget still goes (alone), or it could never run.
            if batch and num_tokens + seq.num_tokens > self.max_num_batched_tokens:
                break
            resumed = bool(seq.block_table)  # a paused sequence's next turn: its blocks kept
            if not (self.block_manager.can_extend(seq) if resumed
                    else self.block_manager.can_allocate(seq)):
                break
            if not resumed and self._chunked(seq):  # prefilled alone, its first chunk this step
                if batch:
                    break
                self.block_manager.allocate(seq)
                self.waiting.popleft()
                seq.status, self.prefilling = SequenceStatus.RUNNING, seq
                return [self._next_chunk()]
            if resumed:
                self.block_manager.extend(seq)
            else:
                self.block_manager.allocate(seq)
            num_tokens += seq.num_tokens - seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            batch.append(seq)
        return batch

    def _decode_batch(self) -> list[Sequence]:
        """Every running sequence with a slot for its next token, in order; while blocks run out,
        the most recently admitted ones are preempted (their blocks freed)."""
        if self.block_manager.append_slots(self.running):  # room for all: no preemption
            return list(self.running)
        batch = []
        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.append_slot(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:  # cannot happen when the pool fits one sequence (checked at admission)
                    self._preempt(seq)
                    break
            else:
                batch.append(seq)
        self.running.extend(batch)
        return batch

    def _preempt(self, seq: Sequence):
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def abort(self) -> list[Sequence]:
        """Stop every unfinished sequence (a partial rollout's spent budget): their blocks freed
        (a resumed turn's too, waiting with the blocks of its earlier turns), the queue emptied.
        Returns them, oldest first; their tokens so far stay."""
        chunking = [self.prefilling] if self.prefilling is not None else []
        stopped = list(self.running) + chunking + list(self.waiting)
        for seq in stopped:
            self.block_manager.deallocate(seq)
            seq.chunk_end = None
        self.prefilling = None
        for seq in stopped:
            seq.status = SequenceStatus.WAITING
        self.running.clear()
        self.waiting.clear()
        return stopped

    def postprocess(self, batch: list[Sequence], token_ids: list[int] | list[list[int]]
                    ) -> list[Sequence]:
        """Append each sequence's sampled token (or tokens: a speculative step's, up to the one
        that finishes it; the rest are dropped); finish and free those that are done, and free the
        blocks a rejected draft held; pause those that take further turns, blocks kept (a run's
        on_end decides what follows). Returns the finished and paused ones."""
        finished = []
        for seq, tokens in zip(batch, token_ids):
            if isinstance(tokens, int):  # a decode step's one token (at batch 256, 256 a step)
                seq.token_ids.append(tokens)
                reason = self._finish_reason(seq, tokens)
                if not reason:
                    continue
            else:
                for token_id in tokens:
                    seq.append(token_id)
                    reason = self._finish_reason(seq, token_id)
                    if reason:
                        break
                else:
                    self.block_manager.trim(seq)
                    continue
            seq.finish_reason = reason
            if seq.pauses:
                seq.status = SequenceStatus.PAUSED
            else:
                self.finish(seq)
            finished.append(seq)
        if finished:
            self.running = deque(s for s in self.running if s.status is SequenceStatus.RUNNING)
        return finished

    def finish(self, seq: Sequence):
        """End a sequence (a paused one too) and free its blocks."""
        seq.status = SequenceStatus.FINISHED
        self.block_manager.deallocate(seq)

    def resume(self, seq: Sequence, token_ids: list[int]):
        """A paused sequence's next turn: `token_ids` (what the environment said, and the next
        generation prompt) appended, to be prefilled from the first token not yet forwarded (its
        last sampled one: every earlier K/V is in its blocks, unless `release` dropped them)."""
        if seq.status is not SequenceStatus.PAUSED:
            raise ValueError(f"resume: sequence {seq.seq_id} is {seq.status.name}, expected PAUSED")
        forwarded = seq.num_tokens - 1
        seq.token_ids += token_ids
        seq.turn_start = seq.num_tokens
        seq.num_cached_tokens = forwarded if seq.block_table else 0
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def release(self, seq: Sequence):
        """Free a paused sequence's blocks (it is recomputed when it resumes): room for the
        others."""
        self.block_manager.deallocate(seq)

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        """"stop" (a stop token, or EOS unless ignored), "length" (the turn's max_new_tokens, the
        request's max_total_tokens or the context) or None, for `seq` ending in `token_id`."""
        request = seq.request
        params = request.params
        if (token_id in params.stop_token_ids
                or (token_id in self.eos_token_ids and not params.ignore_eos)):
            return "stop"
        return "length" if self.at_length(seq, len(seq.token_ids)) else None

    def at_length(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` at `num_tokens` tokens has reached a length that ends it: its turn's
        max_new_tokens, its request's max_total_tokens or the context."""
        limit = seq.request.max_total_tokens
        return (num_tokens - seq.turn_start >= seq.request.params.max_new_tokens
                or num_tokens >= self.max_model_len or bool(limit and num_tokens >= limit))


def _prefill_kind(batch: list[Sequence]) -> tuple[list[Sequence], StepKind]:
    """A prefill's batch with its kind: a CHUNK where its one sequence has a chunk end (a chunk that
    is not its last), else a PREFILL."""
    return batch, StepKind.CHUNK if batch[0].chunk_end is not None else StepKind.PREFILL
