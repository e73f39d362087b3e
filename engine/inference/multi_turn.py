"""Multi-turn generation: trajectories whose turns pause while an environment (or a tool)
answers, then go on in the same sequence with their KV kept: requests of the engine's one loop
(`LLM.run`) with an `on_end` hook on a finished turn.

`generate_turns(llm, prompts, params, on_turn_end)` samples `params.n` trajectories per prompt. When
a trajectory's turn ends (a stop or EOS token: a chat template's end of turn; or the turn's
max_new_tokens), its blocks are kept and `on_turn_end(index, turn_token_ids)` is asked for the next
turn's prompt tokens; it returns a `TurnReply` or a `concurrent.futures.Future` of one, so an
environment step can run in a worker pool while every other sequence keeps decoding. A Future's
reply rejoins when nothing else is left to run (every reply pending then, in row order, whenever
each came): which sequences share a step is a function of the tokens alone, never of when an
environment answered, so a seed draws the same trajectories run after run (a step's rounding
depends on its batch). The reply's tokens are appended as they are (token in, token out: nothing
earlier is re-tokenized) and only they are prefilled (plus the turn's last sampled token, never
forwarded yet): earlier turns' K/V are not computed again, unless the pool ran short and the
paused sequence's blocks were lent to the running ones (then it is recomputed).
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Union

from .request import Request
from .sampling_params import SamplingParams
from .sequence import Sequence, routing_rows
from .stop_rules import StopRule


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
    'max_turns' (the last turn still answered by on_turn_end, whose tokens are then dropped), None
    (stopped by a stop rule).
    prefilled_tokens: tokens this trajectory sent through prefill. routing_rows [P + T] (with
    record_routing): one per token of prompt + token_ids, for LLM.device_routing (-1 where none:
    the last token, never forwarded)."""
    prompt_token_ids: list[int]
    token_ids: list[int]
    model_mask: list[bool]
    logprobs: list[float]
    logprob_slots: list[int]
    turns: int
    finish_reason: str | None
    prefilled_tokens: int
    routing_rows: list[int] = field(default_factory=list)


OnTurnEnd = Callable[[int, list[int]], Union[TurnReply, "Future[TurnReply]"]]


class TurnBook:
    """The bookkeeping of one trajectory's turns beside its Sequence, for every multi-turn run
    (generate_turns here, carried trajectories: engine/agents/carried.py): the model turns so far,
    the spans of environment tokens a run appended, why it ended (None: not yet). opening: the
    tokens of the sequence before the trajectory's own (its prompt); turns: those it had before
    this run."""

    def __init__(self, opening: int, turns: int = 0):
        self.opening, self.turns = opening, turns
        self.environment_spans: list[tuple[int, int]] = []  # [start, end) of appended tokens
        self.finish_reason: str | None = None

    def turn_ended(self, seq: Sequence, limit: int) -> bool:
        """Count the turn `seq` just ended; False (finish 'length') when no room is left below
        `limit` for anything after it."""
        self.turns += 1
        if seq.num_tokens >= limit:
            self.finish_reason = "length"
            return False
        return True

    def end(self, reason: str) -> None:
        self.finish_reason = reason

    def follow(self, seq: Sequence, reply: TurnReply, limit: int, max_turns: int):
        """The run's next move for a reply (turn_ends): its tokens to resume with, or None to end
        the trajectory."""
        reason = turn_ends(reply, self.turns, seq.num_tokens, limit, max_turns)
        if reason is not None:
            return self.end(reason)
        start = seq.num_tokens - self.opening
        self.environment_spans.append((start, start + len(reply.token_ids)))
        return list(reply.token_ids)

    def model_mask(self, earlier: list[bool], length: int) -> list[bool]:
        """The mask of a trajectory of `length` tokens whose first ones had mask `earlier`: True
        on the model's tokens, False on the environment's this run appended."""
        mask = earlier + [True] * (length - len(earlier))
        for start, end in self.environment_spans:
            mask[start:end] = [False] * (end - start)
        return mask


def aligned_logprobs(mask: list[bool], model_logprobs: list[float]) -> list[float]:
    """One log-prob per token of a trajectory: the model's tokens' in order, 0.0 on the
    environment's."""
    model = iter(model_logprobs)
    return [next(model) if is_model else 0.0 for is_model in mask]


def generate_turns(llm, prompts: list[list[int]], params: SamplingParams, on_turn_end: OnTurnEnd, *,
                   max_turns: int, max_total_tokens: int | None = None,
                   stop: StopRule | None = None) -> list[Trajectory]:
    """Trajectories of params.n samples per prompt (token-id prompts), rows prompt by prompt,
    sample by sample; at most `max_turns` model turns each and `max_total_tokens` tokens (prompt
    included; default and ceiling: the model's context). params.max_new_tokens bounds each turn.
    stop: a stop rule over the rows (stop_rules.py; a row ends when its trajectory does): the
    unfinished trajectories are stopped, finish_reason None, each ending where the model speaks
    next (mid-turn, or after the reply it was waiting for)."""
    if not isinstance(max_turns, int) or max_turns < 1:
        raise ValueError(f"max_turns={max_turns!r}: expected an int >= 1")
    limit = min(max_total_tokens or llm.config.max_model_len, llm.config.max_model_len)
    manager = llm.block_manager
    if manager.blocks_for(limit) > manager.num_blocks:
        raise ValueError(
            f"the KV pool ({manager.num_blocks} blocks of {manager.block_size} tokens) cannot "
            f"hold one trajectory of max_total_tokens={limit}; raise the pool or lower the cap")
    requests = [Request(ids, params, sample_index=j, max_total_tokens=limit)
                for ids in prompts for j in range(params.n)]
    rows = [TurnBook(len(request.prompt)) for request in requests]

    def on_end(index: int, seq: Sequence):
        row = rows[index]
        if not row.turn_ended(seq, limit):
            return None
        reply = on_turn_end(index, seq.token_ids[seq.turn_start:])
        if isinstance(reply, Future):
            return _Later(lambda: row.follow(seq, reply.result(), limit, max_turns))
        return row.follow(seq, reply, limit, max_turns)

    seqs = llm.run(requests, stop, on_end)
    return [_trajectory(row, seq) for row, seq in zip(rows, seqs)]


class _Later:
    """What follows a turn once its environment's Future is done: `result()` (LLM.run calls it
    when it waits for the reply) gives the run None or the next turn's tokens."""

    def __init__(self, follow):
        self.result = follow


def turn_ends(reply: TurnReply, turns: int, num_tokens: int, limit: int,
              max_turns: int) -> str | None:
    """Whether a trajectory ends after its reply, and why: 'done' (the environment said so),
    'max_turns' (`turns` model turns used up: the last one is still answered, for its reward),
    'length' (no reply tokens, or no room left below `limit` after them for the model to say
    anything); None: it goes on with the reply's tokens. num_tokens: the sequence's tokens so
    far, prompt included. The one rule every multi-turn run follows (carried trajectories too:
    engine/agents/carried.py)."""
    if not isinstance(reply, TurnReply):
        raise TypeError(f"on_turn_end returned {type(reply).__name__}: expected a TurnReply (or a "
                        "Future of one)")
    if reply.done:
        return "done"
    if turns >= max_turns:
        return "max_turns"
    if not reply.token_ids or num_tokens + len(reply.token_ids) >= limit:
        return "length"
    return None


def _trajectory(row: TurnBook, seq: Sequence) -> Trajectory:
    mask = row.model_mask([], seq.num_tokens - seq.num_prompt_tokens)
    return Trajectory(seq.token_ids[:seq.num_prompt_tokens], seq.completion_token_ids, mask,
                      aligned_logprobs(mask, seq.logprobs), list(seq.logprob_slots), row.turns,
                      row.finish_reason, seq.prefilled_tokens, routing_rows(seq))
