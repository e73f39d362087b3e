"""Multi-turn trajectories run by the engine's one loop, each with its environment: carried across
engine runs (partial rollouts of tools and environments: the environment stays alive while the
trajectory is in flight, and every run continues the unfinished ones from where they stand under a
stop rule, a token budget or enough groups done), or run to their end in one (whole groups).

A trajectory is a plain dict of host lists (what a checkpoint keeps): `answer`, every token after
the group's opening (the model's and the environment's), `mask` (True on the model's), `logprobs`
(the sampler's, one per model token), `turn_start` (where in `answer` the model's current turn
began), `turns`, `finish` (None while in flight) and `seed` (its random stream: a run continues it
at its own positions) or, in a run to the end (whole groups), `index` (which sample of its group it
is: the stream params.seed fixes for it, as LLM.generate_turns draws it; `new_trajectory`). Its
environment (and conversation) lives here, beside it, keyed by the dict's identity: not in a
checkpoint, so a resumed run restarts a trajectory whose environment it no longer has
(`needs_restart`).

A run's requests are each trajectory's opening and finished turns as the prompt and its current
turn's tokens as the answer (so params.max_new_tokens bounds the turn, as in one uninterrupted
run); a finished turn asks the environment in a worker pool (agent_loop.py's `_step`), its reply
rejoining as the engine's on_end hook (inference/multi_turn.py's turn_ends: done, max_turns, no
room left). A reply still pending when the stop rule stops the run is waited for and kept: the
trajectory goes on after it in the next run.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..inference.multi_turn import Trajectory, turn_ends
from ..inference.request import Request
from ..inference.sampling_params import SamplingParams
from .chat_render import ChatRenderer
from .agent_loop import (AgentLimits, AgentTrajectory, Environments, _close_conversation, _opener,
                      _opening, _reset, _State, _step, end_of_turn_params)


def new_trajectory(index: int) -> dict:
    """Sample `index` of its group, no token yet, drawing the stream the run's params.seed fixes
    for it (a whole group's trajectory)."""
    return {"index": index, "answer": [], "mask": [], "logprobs": [], "turn_start": 0,
            "turns": 0, "finish": None}


class CarriedTrajectories:
    """The live environments of the trajectories in flight and the runs that continue them.
    `run(requests, stop, on_end)`: the engine's (HybridActor.run), returning each request's
    Sequence."""

    def __init__(self, run: Callable, renderer: ChatRenderer, environments: Environments,
                 params: SamplingParams, limits: AgentLimits, max_model_len: int):
        self.run, self.renderer, self.limits = run, renderer, limits
        self.params = end_of_turn_params(params, renderer)
        self.opener = _opener(environments, limits)
        self.limit = min(limits.max_total_tokens or max_model_len, max_model_len)
        self.live: dict[int, tuple[dict, _State]] = {}  # id(trajectory) -> (it, its environment)
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="environment")

    def needs_restart(self, trajectory: dict) -> bool:
        """Whether `trajectory` has no environment here (new, or resumed from a checkpoint)."""
        return id(trajectory) not in self.live

    def open(self, starts: list[tuple[dict, dict, list[dict]]]) -> None:
        """Environments for the trajectories about to start: for each (group, row, samples),
        these trajectories of `group` (each reset to no token by the caller) get environments made
        from `row` and reset (every one in the pool at once), their old ones closed; when every
        one of a group starts, its prompt becomes their opening's token ids (the rendered reset
        messages: the same for all its samples)."""
        states = []
        for _, row, samples in starts:
            group_states = []
            for sample in samples:
                old = self.live.pop(id(sample), None)
                if old is not None:
                    old[1].env.close()
                state = _State(self.opener(row))  # its worker spawned here
                self.live[id(sample)] = (sample, state)  # closed by close() whatever follows
                group_states.append(state)
            states.append(group_states)
        list(self.pool.map(lambda s: _reset(s, self.limits), [s for g in states for s in g]))
        for g, ((group, _, samples), group_states) in enumerate(zip(starts, states)):
            opening = _opening(group_states, self.renderer, self.limits, g)
            if len(samples) == len(group["samples"]):
                group["prompt"] = opening

    def advance(self, rows: list[tuple[dict, dict]], stop) -> list:
        """Continue the unfinished trajectories `rows` ((group, trajectory), each opened) in one
        engine run under `stop`, updating each in place; returns the run's Sequences (their routing
        records: the whole sequence's, the opening included)."""
        requests, turns = [], []
        for group, sample in rows:
            start = sample["turn_start"]
            requests.append(Request(group["prompt"] + sample["answer"][:start], self.params,
                                    answer=sample["answer"][start:], seed=sample.get("seed"),
                                    sample_index=sample.get("index", 0),
                                    max_total_tokens=self.limit))
            turns.append(_Run(group, sample, self.live[id(sample)][1]))
        pending: dict[int, _Reply] = {}

        def on_end(index: int, seq):
            run = turns[index]
            run.sample["turns"] += 1
            if seq.num_tokens >= self.limit:
                return run.end("length")
            if run.state.error is not None:  # its reset failed: nothing to step
                return run.end("done")
            future = self.pool.submit(_step, run.state, self.renderer,
                                      seq.token_ids[seq.turn_start:], self.limits)
            pending[index] = _Reply(lambda: run.follow(seq, future.result(), self.limit,
                                                       self.limits.max_turns))
            return _Taken(pending, index)

        seqs = self.run(requests, stop, on_end)
        for run, seq in zip(turns, seqs):
            run.keep(seq)
        for index, reply in sorted(pending.items()):  # waited for: the environment moved on
            turns[index].keep_late(reply())
        return seqs

    def trajectories(self, rows: list[tuple[dict, dict]]) -> list[AgentTrajectory]:
        """The finished trajectories `rows` as AgentTrajectory (their conversations closed), their
        environments closed and forgotten."""
        out = []
        for group, sample in rows:
            _, state = self.live.pop(id(sample))
            state.env.close()
            mask, model = sample["mask"], iter(sample["logprobs"])
            tokens = Trajectory(list(group["prompt"]), list(sample["answer"]), list(mask),
                                [next(model) if m else 0.0 for m in mask], [], sample["turns"],
                                sample["finish"], 0)
            _close_conversation(state, tokens, self.renderer)
            out.append(AgentTrajectory(tokens, state.messages, state.turn_rewards, state.error,
                                       state.error_text, state.seconds, state.opening))
        return out

    def forget(self, keep: list[dict]) -> None:
        """Close the environments of every trajectory not in `keep` (dropped, restarted)."""
        kept = {id(s) for s in keep}
        for key in [k for k in self.live if k not in kept]:
            self.live.pop(key)[1].env.close()

    def close(self) -> None:
        """Every environment closed, the pool shut down (the run is over)."""
        self.forget([])
        self.pool.shutdown(wait=True)


class _Run:
    """One trajectory's part in a run: the environment spans its replies add."""

    def __init__(self, group: dict, sample: dict, state: _State):
        self.group, self.sample, self.state = group, sample, state
        self.spans: list[tuple[int, int]] = []  # [start, end) in the answer, environment tokens

    def end(self, reason: str) -> None:
        self.sample["finish"] = reason
        return None

    def follow(self, seq, reply, limit: int, max_turns: int):
        """The run's next move for a reply (inference/multi_turn.py turn_ends): its tokens, or
        None to end the trajectory."""
        reason = turn_ends(reply, self.sample["turns"], seq.num_tokens, limit, max_turns)
        if reason is not None:
            return self.end(reason)
        start = seq.num_tokens - len(self.group["prompt"])
        self.spans.append((start, start + len(reply.token_ids)))
        return list(reply.token_ids)

    def keep(self, seq) -> None:
        """The run's tokens into the trajectory: its answer, mask, log-probs and current turn."""
        sample, opening = self.sample, len(self.group["prompt"])
        answer = seq.token_ids[opening:]
        mask = sample["mask"] + [True] * (len(answer) - len(sample["mask"]))
        for start, end in self.spans:
            mask[start:end] = [False] * (end - start)
        sample.update(answer=answer, mask=mask, logprobs=sample["logprobs"] + list(seq.logprobs),
                      turn_start=seq.turn_start - opening)

    def keep_late(self, tokens) -> None:
        """A reply that came after the run stopped: appended (context), the next turn after it."""
        if tokens is None:
            return
        sample = self.sample
        sample["answer"] = sample["answer"] + tokens
        sample["mask"] = sample["mask"] + [False] * len(tokens)
        sample["turn_start"] = len(sample["answer"])


class _Reply:
    """A pending reply's follow-up, called once: by the engine when it waits for the reply, or
    after a stopped run."""

    def __init__(self, follow: Callable):
        self.follow = follow

    def __call__(self):
        return self.follow()


class _Taken:
    """The engine's view of a pending reply (an object with result()): taking it removes it from
    the pending ones, so a stopped run knows which are left."""

    def __init__(self, pending: dict, index: int):
        self.pending, self.index = pending, index

    def result(self):
        return self.pending.pop(self.index)()
