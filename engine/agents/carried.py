"""Multi-turn trajectories run by the engine's one loop, each with its environment: carried across
engine runs (partial rollouts of tools and environments: the environment stays alive while the
trajectory is in flight, and every run continues the unfinished ones from where they stand under a
stop rule, a token budget or enough groups done), or run to their end in one (whole groups, and
`run_agents`).

A trajectory is an engine/inference/in_flight.py `Sample` with a model mask (what a checkpoint
keeps: its tokens after the group's opening, the model's and the environment's, the mask, the
sampler's log-probs, where its current turn began, its turns and finish, its seed or index). Its
environment (and conversation) lives on it (`Sample.environment`), never in a checkpoint, so a
resumed run restarts a trajectory whose environment it no longer has (`needs_restart`).

A run's requests are each trajectory's opening and finished turns as the prompt and its current
turn's tokens as the answer (so params.max_new_tokens bounds the turn, as in one uninterrupted
run); a finished turn asks the environment in a worker pool (agent_loop.py's step_environment), its
reply rejoining as the engine's on_end hook (the turn bookkeeping of inference/multi_turn.py's
TurnBook: done, max_turns, no room left). A reply still pending when the stop rule stops the run
is waited for and kept: the trajectory goes on after it in the next run.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..inference.in_flight import Group, Sample
from ..inference.multi_turn import Trajectory, TurnBook, aligned_logprobs
from ..inference.request import Request
from ..inference.sampling_params import SamplingParams
from ..inference.sequence import routing_rows
from .chat_render import ChatRenderer
from .agent_loop import (AgentLimits, AgentTrajectory, Environments, EnvState, close_conversation,
                         end_of_turn_params, opener, opening_ids, reset_environment,
                         step_environment)

Rows = list[tuple[Group, Sample]]


class CarriedTrajectories:
    """The live environments of the trajectories in flight and the runs that continue them.
    `run(requests, stop, on_end)`: the engine's (LLM.run, HybridActor.run), returning each
    request's Sequence."""

    def __init__(self, run: Callable, renderer: ChatRenderer, environments: Environments,
                 params: SamplingParams, limits: AgentLimits, max_model_len: int):
        self.run, self.renderer, self.limits = run, renderer, limits
        self.params = end_of_turn_params(params, renderer)
        self.opener = opener(environments, limits)
        self.limit = min(limits.max_total_tokens or max_model_len, max_model_len)
        self.live: list[Sample] = []  # the trajectories whose environments are open
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="environment")

    @staticmethod
    def needs_restart(trajectory: Sample) -> bool:
        """Whether `trajectory` has no environment here (new, or resumed from a checkpoint)."""
        return trajectory.environment is None

    def open(self, starts: list[tuple[Group, dict, list[Sample]]]) -> None:
        """Environments for the trajectories about to start: for each (group, row, samples),
        these trajectories of `group` (each reset to no token by the caller) get environments made
        from `row` and reset (every one in the pool at once), their old ones closed; when every
        one of a group starts, its prompt becomes their opening's token ids (the rendered reset
        messages: the same for all its samples)."""
        states = []
        for _, row, samples in starts:
            for sample in samples:
                self._close(sample)
                sample.environment = EnvState(self.opener(row))  # its worker spawned here
                self.live.append(sample)  # closed by close() whatever follows
            states.append([sample.environment for sample in samples])
        list(self.pool.map(lambda s: reset_environment(s, self.limits),
                           [s for g in states for s in g]))
        for g, ((group, _, samples), group_states) in enumerate(zip(starts, states)):
            opening = opening_ids(group_states, self.renderer, self.limits, g)
            if len(samples) == len(group.samples):
                group.prompt = opening

    def advance(self, rows: Rows, stop) -> list:
        """Continue the unfinished trajectories `rows` ((group, trajectory), each opened) in one
        engine run under `stop`, updating each in place; returns the run's Sequences (their routing
        records: the whole sequence's, the opening included)."""
        requests, turns = [], []
        for group, sample in rows:
            start = sample.turn_start
            requests.append(Request(group.prompt + sample.tokens[:start], self.params,
                                    answer=sample.tokens[start:], seed=sample.seed,
                                    sample_index=sample.index, max_total_tokens=self.limit))
            turns.append(_Run(group, sample))
        pending: dict[int, Callable] = {}

        def on_end(index: int, seq):
            run = turns[index]
            if not run.book.turn_ended(seq, self.limit):
                return None
            state = run.sample.environment
            if state.error is not None:  # its reset failed: nothing to step
                return run.book.end("done")
            future = self.pool.submit(step_environment, state, self.renderer,
                                      seq.token_ids[seq.turn_start:], self.limits)
            pending[index] = lambda: run.book.follow(seq, future.result(), self.limit,
                                                     self.limits.max_turns)
            return _Taken(pending, index)

        seqs = self.run(requests, stop, on_end)
        for run, seq in zip(turns, seqs):
            run.keep(seq)
        for index, reply in sorted(pending.items()):  # waited for: the environment moved on
            turns[index].keep_late(reply())
        return seqs

    def trajectories(self, rows: Rows, seqs: list | None = None) -> list[AgentTrajectory]:
        """The finished trajectories `rows` as AgentTrajectory (their conversations closed), their
        environments closed and forgotten; seqs: the one run that drew each whole (run to its
        end), whose Sequences give each its log-probs' device slots, prefilled tokens and routing
        rows (as LLM.generate_turns's)."""
        out = []
        for i, (group, sample) in enumerate(rows):
            state = sample.environment
            self._close(sample)
            mask, seq = sample.model_mask, None if seqs is None else seqs[i]
            tokens = Trajectory(list(group.prompt), list(sample.tokens), list(mask),
                                aligned_logprobs(mask, sample.logprobs),
                                [] if seq is None else list(seq.logprob_slots), sample.turns,
                                sample.finish, 0 if seq is None else seq.prefilled_tokens,
                                [] if seq is None else routing_rows(seq))
            close_conversation(state, tokens, self.renderer)
            out.append(AgentTrajectory(tokens, state.messages, state.turn_rewards, state.error,
                                       state.error_text, state.seconds, state.opening))
        return out

    def _close(self, sample: Sample) -> None:
        """`sample`'s environment closed and forgotten (it keeps its state for its trajectory)."""
        if sample.environment is not None and any(s is sample for s in self.live):
            self.live = [s for s in self.live if s is not sample]
            sample.environment.env.close()
        sample.environment = None

    def close(self) -> None:
        """Every environment closed, the pool shut down (the run is over)."""
        for sample in list(self.live):
            self._close(sample)
        self.pool.shutdown(wait=True)


def run_agents(llm, renderer: ChatRenderer, environments: Environments, rows: list[dict],
               params: SamplingParams, limits: AgentLimits) -> list[AgentTrajectory]:
    """params.n trajectories per row (rows prompt by prompt, sample by sample), each run to its end
    with its own environment, sample j of a row drawing the stream params.seed fixes for it.
    `llm`: the engine (LLM or HybridActor: its run and config.max_model_len); `environments`: an
    EnvSource (isolated as limits.env_isolation says) or a function row -> environment (in the
    trainer's threads); the end-of-turn token of the template is added to params' stop tokens."""
    carried = CarriedTrajectories(llm.run, renderer, environments, params, limits,
                                  llm.config.max_model_len)
    groups = [Group.new([], params.n, multi_turn=True) for _ in rows]
    trajectories = [(group, sample) for group in groups for sample in group.samples]
    try:
        carried.open([(group, row, group.samples) for group, row in zip(groups, rows)])
        return carried.trajectories(trajectories, carried.advance(trajectories, None))
    finally:
        carried.close()


class _Run:
    """One trajectory's part in a run: its turns' bookkeeping (TurnBook), kept into it after."""

    def __init__(self, group: Group, sample: Sample):
        self.group, self.sample = group, sample
        self.book = TurnBook(len(group.prompt), sample.turns)

    def keep(self, seq) -> None:
        """The run's tokens into the trajectory: its tokens, mask, log-probs and current turn."""
        sample, opening = self.sample, len(self.group.prompt)
        sample.tokens = seq.token_ids[opening:]
        sample.model_mask = self.book.model_mask(sample.model_mask, len(sample.tokens))
        sample.logprobs = sample.logprobs + list(seq.logprobs)
        sample.turn_start = seq.turn_start - opening
        self._settle()

    def keep_late(self, tokens) -> None:
        """A reply that came after the run stopped: appended (context), the next turn after it."""
        sample = self.sample
        if tokens is not None:
            sample.tokens = sample.tokens + tokens
            sample.model_mask = sample.model_mask + [False] * len(tokens)
            sample.turn_start = len(sample.tokens)
        self._settle()

    def _settle(self) -> None:
        self.sample.turns, self.sample.finish = self.book.turns, self.book.finish_reason


class _Taken:
    """The engine's view of a pending reply (an object with result()): taking it removes it from
    the pending ones, so a stopped run knows which are left."""

    def __init__(self, pending: dict, index: int):
        self.pending, self.index = pending, index

    def result(self):
        return self.pending.pop(self.index)()
