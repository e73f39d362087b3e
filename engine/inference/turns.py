"""Multi-turn generation: sequences that pause at the end of each turn while an environment (or a
tool) answers, then go on in the same sequence with their KV kept.

`generate_turns(llm, prompts, params, on_turn_end)` samples `params.n` trajectories per prompt. When
a trajectory's turn ends (a stop or EOS token: a chat template's end of turn; or the turn's
max_new_tokens), its blocks are kept
and `on_turn_end(index, turn_token_ids)` is asked for the next turn's prompt tokens; it returns a
`TurnReply` or a `concurrent.futures.Future` of one, so an environment step can run in a worker pool
while every other sequence keeps decoding. A Future's reply rejoins when nothing else is left to run
(every reply pending then, in row order, whenever each came): which sequences share a step is a
function of the tokens alone, never of when an environment answered, so a seed draws the same
trajectories run after run (a step's rounding depends on its batch). The reply's tokens are
appended as they are (token in, token out: nothing earlier is re-tokenized) and only they are
prefilled (plus the turn's last sampled token, never forwarded yet): earlier turns' K/V are not
computed again, unless the pool ran short and the paused sequence's blocks were lent to the running
ones (then it is recomputed).
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Union

from .sampling_params import SamplingParams
from .sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class TurnReply:
    """What follows a model turn: `token_ids` to append (the rendered environment or tool messages
    and the next generation prompt), or `done` to end the trajectory (token_ids then ignored)."""
    token_ids: tuple[int, ...] = ()
    done: bool = False


@dataclass
class Trajectory:
    """One multi-turn sample. token_ids [T]: everything after the prompt, model and environment
    tokens in order; model_mask [T]: True where the model sampled the token; logprobs [T]: the
    sampler's log-prob of each model token (0.0 on environment tokens); logprob_slots: the device
    slots of the model tokens' log-probs (LLM.device_logprobs), in order. finish_reason: 'done'
    (the environment ended it), 'length' (a turn's max_new_tokens, the total cap or the context),
    'max_turns' (the last turn still answered by on_turn_end, whose tokens are then dropped).
    prefilled_tokens: tokens this trajectory sent through prefill."""
    prompt_token_ids: list[int]
    token_ids: list[int]
    model_mask: list[bool]
    logprobs: list[float]
    logprob_slots: list[int]
    turns: int
    finish_reason: str
    prefilled_tokens: int


OnTurnEnd = Callable[[int, list[int]], Union[TurnReply, "Future[TurnReply]"]]


class _Turns:
    """The bookkeeping of one trajectory beside its Sequence."""

    def __init__(self, index: int, seq: Sequence):
        self.index, self.seq = index, seq
        self.environment_spans: list[tuple[int, int]] = []  # [start, end) of appended tokens
        self.turns = 0
        self.prefilled = 0
        self.finish_reason = ""


def generate_turns(llm, prompts: list[list[int]], params: SamplingParams, on_turn_end: OnTurnEnd, *,
                   max_turns: int, max_total_tokens: int | None = None) -> list[Trajectory]:
    """Trajectories of params.n samples per prompt (token-id prompts), rows prompt by prompt,
    sample by sample; at most `max_turns` model turns each and `max_total_tokens` tokens (prompt
    included; default and ceiling: the model's context). params.max_new_tokens bounds each turn."""
    if not isinstance(max_turns, int) or max_turns < 1:
        raise ValueError(f"max_turns={max_turns!r}: expected an int >= 1")
    limit = min(max_total_tokens or llm.config.max_model_len, llm.config.max_model_len)
    for i, ids in enumerate(prompts):
        llm._check_request(i, list(ids), params)
    manager = llm.block_manager
    if manager.blocks_for(limit) > manager.num_blocks:
        raise ValueError(
            f"the KV pool ({manager.num_blocks} blocks of {manager.block_size} tokens) cannot "
            f"hold one trajectory of max_total_tokens={limit}; raise the pool or lower the cap")
    rows = []
    for ids in prompts:
        for j in range(params.n):
            seq = llm._add(list(ids), params, j)
            seq.pauses = True
            seq.token_limit = limit
            rows.append(_Turns(len(rows), seq))
    _run(llm, rows, on_turn_end, max_turns, limit)
    llm._collect_logprobs([row.seq for row in rows])
    return [_trajectory(row) for row in rows]


def _run(llm, rows: list[_Turns], on_turn_end: OnTurnEnd, max_turns: int, limit: int) -> None:
    scheduler, runner = llm.scheduler, llm.runner
    by_seq = {row.seq.seq_id: row for row in rows}
    pending: dict[Future, _Turns] = {}
    runner.logprobs_kept = 0
    if runner.routing is not None:
        runner.routing.reset()
    while True:
        if scheduler.is_finished():
            if not pending:
                return
            _rejoin(scheduler, pending, limit, max_turns)
            continue
        batch, is_prefill = scheduler.schedule()
        if not batch:  # the waiting ones need blocks that paused sequences hold: lend them
            if not _release_paused(scheduler, rows):
                if not pending:  # checked at the start: one trajectory always fits the pool
                    raise RuntimeError("multi-turn generation made no progress: nothing runs, "
                                       "nothing waits for an environment")
                _rejoin(scheduler, pending, limit, max_turns)  # a reply may end its trajectory
            continue
        if is_prefill:
            for seq in batch:
                by_seq[seq.seq_id].prefilled += (seq.chunk_end
                                                 or seq.num_tokens) - seq.num_cached_tokens
        # The engine's own step: chunked prefill and speculative tails apply to turns too.
        for seq in llm._step(batch, is_prefill):
            row = by_seq[seq.seq_id]
            row.turns += 1
            reply = _turn_end(scheduler, row, on_turn_end, limit)
            if isinstance(reply, Future):
                pending[reply] = row
            elif reply is not None:
                _continue(scheduler, row, reply, limit, max_turns)


def _rejoin(scheduler, pending: dict, limit: int, max_turns: int) -> None:
    """Every pending reply (Future -> _Turns) waited for and taken in row order, not as they come:
    when an environment answers must not change which sequences share a step."""
    for future, row in sorted(pending.items(), key=lambda item: item[1].index):
        _continue(scheduler, row, future.result(), limit, max_turns)
    pending.clear()


def _turn_end(scheduler, row: _Turns, on_turn_end: OnTurnEnd, limit: int):
    """The environment's reply (or its future) to a finished turn (ended by a stop token, or cut at
    max_new_tokens), or None when the trajectory ends here: at its total-token limit."""
    seq = row.seq
    if seq.num_tokens >= limit:
        return _end(scheduler, row, "length")
    return on_turn_end(row.index, seq.token_ids[seq.turn_start:])


def _continue(scheduler, row: _Turns, reply: TurnReply, limit: int, max_turns: int) -> None:
    """Resume a trajectory with the reply's tokens, or end it (the environment said done, the turns
    are used up: the last one is still answered, for its reward, or no room is left)."""
    if not isinstance(reply, TurnReply):
        raise TypeError(f"on_turn_end returned {type(reply).__name__}: expected a TurnReply (or a "
                        "Future of one)")
    if reply.done:
        _end(scheduler, row, "done")
    elif row.turns >= max_turns:
        _end(scheduler, row, "max_turns")
    elif not reply.token_ids or row.seq.num_tokens + len(reply.token_ids) >= limit:
        _end(scheduler, row, "length")  # no room left for the model to say anything
    else:
        start = row.seq.num_tokens - row.seq.num_prompt_tokens
        row.environment_spans.append((start, start + len(reply.token_ids)))
        scheduler.resume(row.seq, list(reply.token_ids))


def _end(scheduler, row: _Turns, reason: str) -> None:
    row.finish_reason = reason
    scheduler.finish(row.seq)


def _release_paused(scheduler, rows: list[_Turns]) -> bool:
    """Free the blocks of every paused sequence (recomputed when it resumes); False if none held
    any."""
    held = [row.seq for row in rows
            if row.seq.status is SequenceStatus.PAUSED and row.seq.block_table]
    for seq in held:
        scheduler.release(seq)
    return bool(held)


def _trajectory(row: _Turns) -> Trajectory:
    seq = row.seq
    mask = [True] * (seq.num_tokens - seq.num_prompt_tokens)
    for start, end in row.environment_spans:
        mask[start:end] = [False] * (end - start)
    model_logprobs = iter(seq.logprobs)
    logprobs = [next(model_logprobs) if is_model else 0.0 for is_model in mask]
    return Trajectory(seq.token_ids[:seq.num_prompt_tokens], seq.completion_token_ids, mask,
                      logprobs, list(seq.logprob_slots), row.turns, row.finish_reason,
                      row.prefilled)
