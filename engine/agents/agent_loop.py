"""Multi-turn rollouts' environments: each trajectory's environment and conversation
(`EnvState`), opened, reset, stepped and closed for the runs that continue the trajectories
(carried.py: the engine's paused-turn sequences, inference/multi_turn.py, while the environments'
steps run in a pool, so a slow step holds up only its own trajectory).

Each trajectory's environment lives in a worker process of its own (rollout.env_isolation=process,
isolation.py) or in the trainer ('thread'). Every call (the class and reset, then each step, with
the rendering of what it returned) runs under rollout.env_timeout_s: an exception, a broken or
oversized return value, a message the chat template refuses, or a timeout ends that trajectory
(env_errors='skip': it leaves the batch, counted) or the run (env_errors='fail': one line).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Union

from ..inference.multi_turn import Trajectory, TurnReply
from ..inference.sampling_params import SamplingParams
from .chat_render import ChatRenderer
from .environment import EnvironmentFailure
from .isolation import EnvTimeout, ProcessEnvironment, ThreadEnvironment
from .sources import EnvSource


@dataclass(frozen=True)
class AgentLimits:
    """max_turns: model turns per trajectory; max_total_tokens: prompt and every turn (None: the
    model's context); env_timeout_s: one environment call; env_errors: 'skip' or 'fail';
    max_observation_chars: the characters of the messages one call returns; env_isolation:
    'process' or 'thread'."""
    max_turns: int
    max_total_tokens: int | None
    env_timeout_s: float
    env_errors: str = "skip"
    max_observation_chars: int = 100_000
    env_isolation: str = "process"


@dataclass
class AgentTrajectory:
    """One trajectory: the engine's tokens (model mask, log-probs) and the conversation as messages
    (the `opening` ones, then each assistant turn and what answered it); reward: the sum of the
    environment's turn rewards, NaN for a trajectory that left the batch (error: 'error' or
    'timeout', with `error_text`; None when it ran to its end)."""
    tokens: Trajectory
    messages: list[dict]
    turn_rewards: list[float] = field(default_factory=list)
    error: str | None = None
    error_text: str = ""
    step_seconds: float = 0.0
    opening: int = 0

    @property
    def reward(self) -> float:
        return float("nan") if self.error else sum(self.turn_rewards)


class EnvState:
    """An environment and its conversation, beside the engine's sequence."""

    def __init__(self, env):
        self.env, self.messages, self.opening = env, [], 0
        self.turn_rewards: list[float] = []
        self.error: str | None = None
        self.error_text = ""
        self.seconds = 0.0


Environments = Union[EnvSource, Callable[[dict], object]]


def end_of_turn_params(params: SamplingParams, renderer: ChatRenderer) -> SamplingParams:
    """`params` with the template's end-of-turn token among its stop tokens: a model turn ends
    there."""
    stops = tuple(sorted(set(params.stop_token_ids) | {renderer.end_of_turn_id}))
    return dataclasses.replace(params, stop_token_ids=stops)


def opener(environments: Environments, limits: AgentLimits) -> Callable:
    """row -> a trajectory's environment handle (isolation.py)."""
    cap = limits.max_observation_chars
    if not isinstance(environments, EnvSource):
        return lambda row: ThreadEnvironment(environments, row, cap)
    if limits.env_isolation == "process":
        return lambda row: ProcessEnvironment(environments, row, cap)
    make = environments.loader()
    return lambda row: ThreadEnvironment(make, row, cap, environments.name)


def reset_environment(state: EnvState, limits: AgentLimits) -> None:
    """A trajectory's environment made and reset under the timeout."""
    messages = _timed(state, lambda: state.env.reset(limits.env_timeout_s), limits)
    if messages is not None:
        state.messages, state.opening = messages, len(messages)


def opening_ids(group: list[EnvState], renderer: ChatRenderer, limits: AgentLimits,
             g: int) -> list[int]:
    """The prompt ids of a group's trajectories: its reset messages, rendered (a message the
    template refuses ends the group's trajectories as an environment error)."""
    n = len(group)
    first = next((s.messages for s in group if s.error is None), None)
    if any(s.error is None and s.messages != first for s in group):
        raise EnvironmentFailure(
            f"rollout.environment: reset() gave different messages for the "
            f"{n} samples of row {g}; a GRPO group shares its prompt")
    if first is not None:
        try:
            return renderer.opening(first)
        except Exception as e:  # jinja2's TemplateError (a role it refuses), or ours
            for state in group:
                _fail(state, "error", f"{state.env.name}: rendering reset()'s messages raised "
                                      f"{type(e).__name__}: {e}", limits)
    return renderer.opening([{"role": "user", "content": ""}])


def close_conversation(state: EnvState, trajectory: Trajectory, renderer: ChatRenderer) -> None:
    """The last turn as a message when no environment step saw it (the turn or token limit ended the
    trajectory first): the model's tokens after the last environment token."""
    said = sum(m["role"] == "assistant" for m in state.messages)
    if state.error is None and said < trajectory.turns:
        mask = trajectory.model_mask
        start = len(mask) - next((i for i, m in enumerate(reversed(mask)) if not m), len(mask))
        state.messages.append({"role": "assistant",
                               "content": renderer.turn_text(trajectory.token_ids[start:])})


def step_environment(state: EnvState, renderer: ChatRenderer, turn_ids: list[int],
          limits: AgentLimits) -> TurnReply:
    """The environment's answer to one assistant turn, as the tokens that follow it (or done)."""
    message = {"role": "assistant", "content": renderer.turn_text(turn_ids)}
    state.messages.append(message)

    def answer():
        start = time.monotonic()
        messages, reward, done = state.env.step(dict(message), limits.env_timeout_s)
        if done or not messages:
            return reward, messages, None
        # A turn cut at max_new_tokens never sampled the end-of-turn token: the suffix closes it.
        closing = ([] if turn_ids and turn_ids[-1] == renderer.end_of_turn_id
                   else [renderer.end_of_turn_id])
        try:
            ids = closing + renderer.continuation(messages)
        except Exception as e:  # jinja2's TemplateError (a role it refuses), or ours
            raise EnvironmentFailure(f"rendering step()'s messages raised {type(e).__name__}: "
                                     f"{e}") from None
        if time.monotonic() - start > limits.env_timeout_s:  # the rendering counts too
            raise EnvTimeout(f"step() and the rendering of its messages took more than "
                             f"rollout.env_timeout_s={limits.env_timeout_s:g} s")
        return reward, messages, ids
    outcome = _timed(state, answer, limits)
    if outcome is not None:
        reward, messages, ids = outcome
        state.turn_rewards.append(reward)
        state.messages += messages
        if ids is not None:
            return TurnReply(tuple(ids))
    state.env.close()  # its worker's memory goes now, not at the end of the rollout
    return TurnReply(done=True)


def _timed(state: EnvState, call: Callable, limits: AgentLimits):
    """call()'s value; None (and the state's error set) when the environment failed or timed out;
    with env_errors='fail' the failure is raised instead, naming the environment."""
    start = time.monotonic()
    try:
        return call()
    except EnvTimeout as e:
        _fail(state, "timeout", f"{state.env.name}: {e}", limits)
    except EnvironmentFailure as e:
        _fail(state, "error", f"{state.env.name}: {e}", limits)
    finally:
        state.seconds += time.monotonic() - start
    return None


def _fail(state: EnvState, kind: str, text: str, limits: AgentLimits) -> None:
    if limits.env_errors == "fail":
        raise EnvironmentFailure(text + " (rollout.env_errors=fail)")
    state.error, state.error_text = kind, text


def agent_metrics(trajectories: list[AgentTrajectory]) -> dict:
    """turns/mean, turns/max, tokens/model, tokens/environment, env/errors (the trajectories that
    left the batch), env/timeouts (those of them that timed out), env/step_seconds (the
    environments' time, summed over trajectories)."""
    turns = [t.tokens.turns for t in trajectories]
    model = sum(sum(t.tokens.model_mask) for t in trajectories)
    total = sum(len(t.tokens.model_mask) for t in trajectories)
    return {"turns/mean": sum(turns) / max(len(turns), 1), "turns/max": max(turns, default=0),
            "tokens/model": model, "tokens/environment": total - model,
            "env/errors": sum(t.error is not None for t in trajectories),
            "env/timeouts": sum(t.error == "timeout" for t in trajectories),
            "env/step_seconds": sum(t.step_seconds for t in trajectories)}
