"""The engine's one loop, in the shape of nano-vllm's LLMEngine: `add(request)` queues a Request
(request.py), `step()` runs one step, its kind (a prefill, a prompt's chunk, a decode step: the
scheduler's; a speculative verify step where the decode tail has drafts) run by one path that
keeps its tokens' log-prob slots and routing records in one place for every kind;
`run(requests, stop, on_end)` steps until every sequence is done or a stop rule (stop_rules.py)
says so, with an `on_end` hook on a finished turn that ends the sequence, resumes it with more
tokens (an environment's reply) or hands back a Future of either, waited for only when nothing
else can run.

`EngineLoop(scheduler, blocks, runner, drafts, seed)` runs on the parts it is given and makes its
own state (the paused turns, the next sequence id, the random stream of unseeded requests); LLM
(llm.py) builds the parts from a model and the requests of its generate and generate_turns.

Decode steps launched ahead (`overlap`, LLM's default on a GPU): a decode step whose next step is
plainly a decode step of its running sequences one token further (nothing waits to be admitted, no
prompt is being chunked, not the speculative tail, no routing records) launches that next step
before it reads its own draws, the next step's input ids being those draws on the device (gathered
to the rows still running where the step before ended some). The device then runs one step while
the host reads the one before and does its bookkeeping (the tokens appended, the finished ones
freed, the next step's inputs written and its graph launched): on a GPU, time the device no longer
waits through. A row whose sequence the step before ended (a stop token, its length) is a wasted
row of the step launched ahead: its draw and log-prob are dropped, and its slot, taken ahead, is
freed with its blocks. Every token and log-prob is the one a step at a time draws (a draw is a
function of the sequence's seed and position, whatever the batch), except where a batch's size
moves a logit's last bits: a step launched ahead keeps the rows the step before ended.
"""
from __future__ import annotations

import math
import operator
import random
from typing import Callable, Iterable

from ..errors import NonFiniteError
from .block_manager import BlockManager
from .drafts import Drafts
from .image_prefill import attach_positions, check_images
from .request import Request
from .runner import Launched, ModelRunner
from .sampling_params import SamplingParams
from .scheduler import Scheduler, StepKind
from .sequence import Sequence, SequenceStatus
from .stop_rules import StopRule

# What on_end (LLM.run) gives for a finished turn: None ends the sequence, token ids resume it,
# an object with .result() (a Future) gives either when the run waits for it.
TurnEnd = Callable[[int, Sequence], object]


class EngineLoop:
    """Requests in, steps run, sequences out, over its parts: `scheduler` (which sequences run
    next, and the step's kind), `blocks` (the KV pool's blocks), `runner` (the model's forwards and
    the kept log-probs) and `drafts` (speculative decoding's drafts for the decode tail). `seed`:
    of the stream unseeded requests draw their seeds from (None: from the OS); every tensor rank
    must pass the same one. overlap: launch decode steps ahead (the module docstring)."""

    def __init__(self, scheduler: Scheduler, blocks: BlockManager, runner: ModelRunner,
                 drafts: Drafts, seed: int | None = None, overlap: bool = False):
        self.scheduler, self.block_manager, self.runner, self.drafts = (
            scheduler, blocks, runner, drafts)
        self.config = runner.config
        self.overlap = overlap
        self._next_seq_id = 0
        self._paused: dict[int, Sequence] = {}  # seq_id -> a finished turn kept for on_end
        self._rng = random.Random(seed)
        self._ahead: Launched | None = None  # a decode step launched ahead, not yet read
        self.last_drawn = 0  # tokens the last step drew (rows kept): a run's stop rules read it
        self.last_kind: StepKind | None = None  # the kind of the step the last step() read

    def add(self, request: Request, index: int = 0) -> Sequence:
        """Queue one request (checked first: `index` names it in the error); the next steps run it.
        Added to an idle engine it starts a new run: the last one's device log-probs and routing
        records are dropped. Returns its Sequence (tokens, logprob_slots, routing_rows,
        finish_reason as the steps go)."""
        self.check(request, index)
        return self._queue(request)

    def check(self, request: Request, index: int = 0) -> None:
        """A ValueError naming requests[index] when the request cannot run: not a Request of
        SamplingParams, an empty prompt or one that fills the context, a token id outside the
        vocabulary, an answer that leaves nothing to generate, a sequence the KV pool cannot
        hold, or images that do not match the prompt's placeholders (image_prefill.py)."""
        if not isinstance(request, Request):
            raise TypeError(f"requests[{index}] must be a Request, got {type(request).__name__}")
        params, ids = request.params, request.prompt
        max_len, vocab = self.config.max_model_len, self.config.vocab_size
        if not isinstance(params, SamplingParams):
            raise TypeError(
                f"sampling_params[{index}] must be a SamplingParams, got {type(params).__name__}")
        if not ids:
            raise ValueError(f"prompts[{index}] is empty: a prompt needs at least one token")
        if len(ids) >= max_len:
            raise ValueError(
                f"prompts[{index}] has {len(ids)} tokens, which leaves no room to generate "
                f"within the context length max_model_len={max_len}")
        tokens = ids + request.answer
        if min(tokens) < 0 or max(tokens) >= vocab:
            bad = next(t for t in tokens if not 0 <= t < vocab)
            raise ValueError(
                f"prompts[{index}] has token id {bad} outside the vocabulary [0, {vocab})")
        check_images(request, self.config, index)
        longest = min(len(ids) + params.max_new_tokens, max_len)
        if request.answer and len(ids) + len(request.answer) >= longest:
            raise ValueError(f"answers[{index}] has {len(request.answer)} tokens: nothing is left "
                             "to generate")
        needed = self.block_manager.blocks_for(longest)
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"the KV pool ({self.block_manager.num_blocks} blocks of "
                f"{self.block_manager.block_size} tokens) cannot hold one sequence of "
                f"prompts[{index}] ({longest} tokens = {needed} blocks); "
                "raise kv_cache_memory or lower max_new_tokens")

    @property
    def reads_ahead(self) -> bool:
        """Whether the next step() reads a decode step launched ahead (before the last was read)."""
        return self._ahead is not None

    def step(self) -> list[Sequence] | None:
        """One step of the queued sequences: scheduled (its kind the scheduler's; a decode step of
        the tail with drafts a VERIFY), run, its tokens appended and their log-prob slots and
        routing records kept (here, for every kind). Returns the sequences whose turn it finished
        (ended, or PAUSED with their blocks kept when they pause), or None when nothing can run
        (every waiting sequence needs blocks that paused ones hold, and none holds any). With a
        decode step launched ahead, this step is that one, read (and maybe the next launched)."""
        self.last_drawn, self.last_kind = 0, None
        if self._ahead is not None:
            return self._read_ahead()
        batch, kind = self.scheduler.schedule()
        if not batch and self._release_held():
            batch, kind = self.scheduler.schedule()
        if not batch:
            return None
        drafts = self.drafts.propose(batch) if kind is StepKind.DECODE else None
        if drafts is not None:
            kind = StepKind.VERIFY
        self.last_kind = kind
        routing = self.runner.routing is not None
        # positions each sequence forwards in this step: [start, end) (a decode step's only to
        # keep routing records)
        if kind is StepKind.DECODE:
            spans = [(s, s.num_tokens - 1, s.num_tokens) for s in batch] if routing else None
        elif kind is StepKind.VERIFY:
            spans = [(s, s.num_tokens - 1, s.num_tokens + len(d)) for s, d in zip(batch, drafts)]
        else:
            spans = [(s, s.num_cached_tokens, s.chunk_end or s.num_tokens) for s in batch]
            for seq, start, end in spans:
                seq.prefilled_tokens += end - start
        first = self.runner.logprobs_kept
        if kind is StepKind.CHUNK:
            self.runner.prefill_chunk(batch[0])
        elif kind is StepKind.VERIFY:
            emitted = self.runner.verify(batch, drafts)
            self.drafts.count(drafts, emitted)
            self.last_drawn = self.runner.logprobs_kept - first
        else:  # one token a row; a decode step maybe with the next launched before it is read
            ahead = kind is StepKind.DECODE and self._goes_ahead(batch)
            launched = self.runner.launch(batch, kind is StepKind.PREFILL, staged=ahead)
            self.last_drawn = len(batch)
            if ahead:
                self._launch_ahead(batch, launched.tokens)
            emitted = self.runner.read(launched)
        if routing:  # before postprocess frees a finished one's blocks
            self.runner.keep_routing(spans, kind is StepKind.DECODE)
        if kind is StepKind.CHUNK:
            self.scheduler.chunk_done(batch[0])
            return []
        if kind is StepKind.VERIFY:
            before = [seq.num_tokens for seq in batch]
            finished = self.scheduler.postprocess(batch, emitted)
            # A finishing token drops the draws after it: their slots are skipped, and the rows
            # of positions a rejected draft held (the last token has none: not forwarded yet).
            for seq, tokens, had in zip(batch, emitted, before):
                seq.logprob_slots += range(first, first + seq.num_tokens - had)
                first += len(tokens)
                del seq.routing_rows[seq.num_tokens - 1:]
        else:  # one token a row, each kept: its log-prob at the row's slot
            finished = self.scheduler.postprocess(batch, emitted)
            for slot, seq in enumerate(batch, first):
                seq.logprob_slots.append(slot)
        return self._ended(finished)

    def _ended(self, finished: list[Sequence]) -> list[Sequence]:
        """A step's finished and paused sequences, the paused kept for on_end; a step launched
        ahead whose rows all ended is dropped (what it runs is never read)."""
        for seq in finished:
            if seq.status is SequenceStatus.PAUSED:
                self._paused[seq.seq_id] = seq
        if self._ahead is not None and not any(
                seq.status is SequenceStatus.RUNNING for seq in self._ahead.seqs):
            self._ahead = None
        return finished

    def _goes_ahead(self, batch: list[Sequence]) -> bool:
        """Whether the step after a decode step of `batch` is a decode step of the same sequences
        one token further, to be launched before this one is read: overlap is on, no routing
        records are kept and the next step drafts nothing (a batch of the speculative tail; each
        needs the draws on the host), nothing is being chunked or waits to be admitted, `batch`
        is every running sequence, in order, and not every one of them ends by its length at this
        step (a run's last step launches nothing after it)."""
        scheduler, drafts = self.scheduler, self.drafts
        return (self.overlap and self.runner.routing is None
                and (not drafts.tokens or len(batch) >= drafts.below)
                and scheduler.prefilling is None and not scheduler.waiting
                and len(batch) == len(scheduler.running)
                and all(map(operator.is_, batch, scheduler.running))
                and not all(scheduler.at_length(seq, seq.num_tokens + 1) for seq in batch))

    def _launch_ahead(self, batch: list[Sequence], draws) -> None:
        """The decode step of `batch` one token further, its input ids `draws` (the device draws
        of the step it continues, not yet read), launched as `_ahead` where every row's next slot
        can be taken; else nothing (the step is read first, then scheduled as any other)."""
        if self.block_manager.append_slots(batch, ahead=1):
            self._ahead = self.runner.launch(batch, False, staged=True, previous=draws)

    def _read_ahead(self) -> list[Sequence]:
        """The step launched ahead, read: the next launched first (its rows the sequences still
        running, their input ids gathered from this step's draws) where it goes ahead too; the
        rows of sequences the step before ended are dropped, the others' tokens appended (their
        log-probs at the step's slots)."""
        step, self._ahead = self._ahead, None
        self.last_kind = StepKind.DECODE
        rows = [i for i, seq in enumerate(step.seqs) if seq.status is SequenceStatus.RUNNING]
        batch = [step.seqs[i] for i in rows]
        if batch and self._goes_ahead(batch):
            self._launch_ahead(batch, self.runner.draws_at(step, rows))
        tokens = self.runner.read(step)
        finished = self.scheduler.postprocess(batch, [tokens[i] for i in rows])
        for i, seq in zip(rows, batch):
            seq.logprob_slots.append(step.first + i)
        self.last_drawn = len(batch)
        return self._ended(finished)

    def run(self, requests: Iterable[Request], stop: StopRule | None = None,
            on_end: TurnEnd | None = None, use_tqdm: bool = False) -> list[Sequence]:
        """Run `requests` (all checked before any runs) in one run: steps until every sequence is
        done, or until `stop(request indices ended in the step, tokens drawn in it)` says so (the
        unfinished ones, paused ones included, are then stopped: finish_reason None, their blocks
        freed; a reply still pending is waited for and its tokens appended, unprefilled, so a
        stopped sequence ends where the model speaks next). on_end(index, sequence): called for
        each finished turn (a stop token, EOS or the turn's max_new_tokens) of the run's
        sequences, which then pause with their KV kept; it returns None (the sequence ends), the
        next turn's token ids to append and prefill (it resumes), or an object with .result() (a
        Future) giving one of them, waited for only when nothing else can run and then taken in
        request order: which sequences share a step is a function of the tokens alone, never of
        when a reply came. An error (a hook's) stops every sequence and propagates. Returns the
        run's sequences in request order, with their host log-probs (a non-finite one raises
        NonFiniteError)."""
        requests = list(requests)
        for i, request in enumerate(requests):
            self.check(request, i)
        if not self.scheduler.is_finished() or self._paused:
            raise RuntimeError("run: the engine has sequences in flight (added and not stepped to "
                               "the end)")
        seqs = [self._queue(request) for request in requests]
        index = {seq.seq_id: i for i, seq in enumerate(seqs)}
        for seq in seqs:
            seq.pauses = on_end is not None
        pending: dict[int, tuple[Sequence, object]] = {}  # index -> (sequence, its Future)
        progress = _progress(len(seqs)) if use_tqdm else None
        try:
            while not self.scheduler.is_finished() or pending:
                self.last_drawn = 0
                finished = None if self.scheduler.is_finished() else self.step()
                ended = []
                if finished is None:  # nothing can run: every reply pending is waited for
                    if not pending:
                        raise RuntimeError(self._no_progress())
                    replies = [(i, seq, reply.result())
                               for i, (seq, reply) in sorted(pending.items())]
                    pending.clear()
                    ended = [i for i, seq, reply in replies if self._follow(seq, reply)]
                for seq in finished or ():
                    i = index[seq.seq_id]
                    reply = None if on_end is None else on_end(i, seq)
                    if reply is not None and not isinstance(reply, (list, tuple)):
                        pending[i] = (seq, reply)
                    elif self._follow(seq, reply):
                        ended.append(i)
                if progress is not None:
                    progress.update(len(ended))
                # the tokens this step drew: a speculative step's accepted drafts included
                if stop is not None and stop(ended, self.last_drawn):
                    self._settle(pending)
                    self._stop()
                    break
        except BaseException:  # a hook's error: the engine is left idle for the next run
            self._stop()
            raise
        finally:
            if progress is not None:
                progress.close()
        self._collect_logprobs(seqs)
        return seqs

    def _queue(self, request: Request) -> Sequence:
        if self.scheduler.is_finished() and not self._paused:  # an idle engine: a new run
            self.runner.start_run()
        # Sample j of a seeded request gets its own stream, fixed by (seed, prompt, j): the same
        # wherever the prompt sits in the batch, and never another prompt's. Keyed by (seed, j)
        # alone, sample j of every prompt would read the same random numbers and choose alike: a
        # rollout of 16 prompts x 8 samples would hold 8 independent draws, not 128.
        params = request.params
        if request.seed is not None:
            seed = request.seed
        elif params.seed is None:
            seed = self._rng.getrandbits(63)
        else:
            seed = hash((params.seed, request.prompt, request.sample_index)) & (2**63 - 1)
        seq = Sequence(self._next_seq_id, request, seed)
        attach_positions(seq, self.config, self.runner.images)
        self._next_seq_id += 1
        self.scheduler.add(seq)
        return seq

    def _follow(self, seq: Sequence, reply) -> bool:
        """What follows a finished turn: None ends the sequence (True), token ids resume it."""
        if reply is None:
            if seq.status is SequenceStatus.PAUSED:
                del self._paused[seq.seq_id]
                self.scheduler.finish(seq)
            return True
        if not isinstance(reply, (list, tuple)) or not all(isinstance(t, int) for t in reply):
            raise TypeError(f"on_end gave {type(reply).__name__} for request sequence "
                            f"{seq.seq_id}: expected None or a list of token ids")
        del self._paused[seq.seq_id]
        self.scheduler.resume(seq, list(reply))
        return False

    def _no_progress(self) -> str:
        """Why nothing runs and nothing waits for a reply: a resumed turn made its sequence longer
        than the KV pool (a request's first turn is checked at admission, the later ones grow)."""
        blocks, head = self.block_manager, next(iter(self.scheduler.waiting), None)
        needed = 0 if head is None else blocks.blocks_for(head.num_tokens)
        if needed > blocks.num_blocks:
            return (f"request sequence {head.seq_id} has grown to {head.num_tokens} tokens over "
                    f"its turns ({needed} blocks), more than the KV pool holds "
                    f"({blocks.num_blocks} blocks of {blocks.block_size} tokens); raise "
                    "kv_cache_memory or cap the trajectory (max_total_tokens)")
        return "generation made no progress: nothing runs, nothing waits for a reply"

    def _release_held(self) -> bool:
        """When nothing can run: free the blocks of every paused sequence and of every resumed turn
        still waiting to be admitted with its blocks (each recomputed when it runs), oldest first;
        False if none held any. A resumed turn keeps its blocks while it waits, so turns resumed
        together could hold the pool that the queue's head needs, and no step would run again."""
        held = [seq for _, seq in sorted(self._paused.items()) if seq.block_table]
        held += [seq for seq in self.scheduler.waiting if seq.block_table]
        for seq in held:
            self.scheduler.release(seq)
        return bool(held)

    def _settle(self, pending: dict) -> None:
        """At a stop: every pending reply waited for, in request order; its token ids appended to
        the paused sequence (a new turn, not prefilled: the stop stops it) or, for None, the
        sequence ended."""
        for _, (seq, reply) in sorted(pending.items()):
            tokens = reply.result()
            if tokens is None:
                self._follow(seq, None)
            else:
                seq.token_ids += list(tokens)
                seq.turn_start = seq.num_tokens
        pending.clear()

    def _stop(self) -> None:
        """A stop rule's stop: every unfinished sequence stopped, paused ones included (their
        blocks freed, finish_reason None); their tokens so far stay."""
        if self._ahead is not None:  # never read: waited for, so that nothing it runs outlives
            self.runner.read(self._ahead)  # the run (a trainer may free the weights it reads)
            self._ahead = None
        stopped = self.scheduler.abort()
        for seq in self._paused.values():
            self.scheduler.release(seq)
            seq.status = SequenceStatus.WAITING
            stopped.append(seq)
        self._paused.clear()
        for seq in stopped:
            seq.finish_reason = None

    def _collect_logprobs(self, seqs: list[Sequence]) -> None:
        """Fill each sequence's host log-probs from the device buffer (one copy for the whole call),
        raising NonFiniteError at a log-prob that is not finite, which only non-finite logits give
        (a NaN or +inf logit spoils the whole softmax; a sampled token has probability > 0)."""
        kept = self.runner.kept_logprobs()
        for seq in seqs:
            seq.logprobs = [kept[slot] for slot in seq.logprob_slots]
            bad = next((x for x in seq.logprobs if not math.isfinite(x)), None)
            if bad is not None:
                raise NonFiniteError(
                    f"the model's logits are not finite (sampled log-prob {bad} for request "
                    f"{seq.seq_id}): its weights or activations hold NaN or inf")


def _progress(total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="generate", unit="seq")
