"""The environment protocol of multi-turn rollouts (`rollout.environment=module:Class`).

A class, made once per trajectory with the row's columns as keyword arguments (`prompt` included):

    class Env:
        def __init__(self, **columns): ...
        def reset(self) -> list[dict]:
            # the messages that open the conversation, e.g. [{"role": "user", "content": ...}]
        def step(self, assistant_message: dict) -> tuple[list[dict], float | None, bool]:
            # assistant_message: {"role": "assistant", "content": the model's turn as text}
            # returns (messages to append: "user" or "tool" roles, this turn's reward or None,
            #          done: True ends the trajectory)

The trajectory's score is the sum of its turns' rewards (None counts 0), plus the run's reward
functions on the model's turns where reward_fn is set. An exception, a step past
rollout.env_timeout_s, or messages over rollout.max_observation_chars end the trajectory
(rollout.env_errors=skip: it leaves the batch, counted) or the run (fail). This follows OpenEnv's
reset/step shape with chat messages as observations and actions.
"""
from __future__ import annotations

import inspect
import numbers

from ..errors import UsageError
from .loading import load_object


FLOAT32_MAX = 3.4028234663852886e38  # a reward beyond it is inf in the float32 scores


class EnvironmentFailure(RuntimeError):
    """An environment (or tool) broke its contract, raised, or timed out: ends its trajectory."""


def load_environment(spec: str) -> type:
    """'module:Class' -> the class, checked to have reset() and step()."""
    cls = load_object(spec, "rollout.environment")
    if (not inspect.isclass(cls)
        or not all(callable(getattr(cls, m, None)) for m in ("reset", "step"))):
        raise UsageError(
            f"rollout.environment={spec!r}: expected a class with reset() and step(message)")
    return cls


def checked_messages(messages, where: str, max_chars: int) -> list[dict]:
    """`messages` as a list of {"role": str, "content": str} (extra keys kept), their contents at
    most `max_chars` characters together (rollout.max_observation_chars), or EnvironmentFailure."""
    if not isinstance(messages, (list, tuple)):
        raise EnvironmentFailure(
            f"{where} returned {type(messages).__name__}: expected a list of messages")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise EnvironmentFailure(f"{where} returned the message {str(m)[:120]!r}: expected "
                                    '{"role": str, "content": str}')
    chars = sum(len(m["content"]) for m in messages)
    if chars > max_chars:
        raise EnvironmentFailure(f"{where} returned {chars} characters of messages, over "
                                 f"rollout.max_observation_chars={max_chars}")
    return list(messages)


def checked_step(result, where: str, max_chars: int) -> tuple[list[dict], float, bool]:
    """A step's (messages, reward, done), the reward a finite number within float32's range (the
    scores' dtype; None -> 0.0)."""
    if not (isinstance(result, tuple) and len(result) == 3):
        raise EnvironmentFailure(
            f"{where} returned {str(result)[:120]!r}: expected (messages, reward, done)")
    messages, reward, done = result
    reward = 0.0 if reward is None else reward
    if (isinstance(reward, bool) or not isinstance(reward, numbers.Real)
            or not abs(reward) <= FLOAT32_MAX):  # NaN fails too; a huge int compares exactly
        shown = (f"an int of {reward.bit_length()} bits" if isinstance(reward, int)
                 and abs(reward) > FLOAT32_MAX else repr(reward)[:60])
        raise EnvironmentFailure(f"{where} returned the reward {shown}: expected a finite number "
                                 f"within float32's range (|reward| <= {FLOAT32_MAX:.4g}) or None")
    return checked_messages(messages, where, max_chars), float(reward), bool(done)
