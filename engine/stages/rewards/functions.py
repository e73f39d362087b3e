"""A user's reward function, contained: whatever it does is the run's failure, said in one line.

`call_reward_fn(fn, name, prompts, responses, timeout_s)` runs fn(prompt_texts, response_texts) in a
worker thread and waits at most `timeout_s` (reward.fn_timeout_s). Any exception it raises --
`SystemExit`, and a `KeyboardInterrupt` of its own, included -- a hang past the timeout, and a
return value that is not one real number per response are a `RewardFunctionError` (exit 1) naming
the function. A real Ctrl-C still stops the run: the signal reaches the main thread, which is
waiting in `join`, not the worker.

Why a thread: a Python function cannot be stopped from outside its thread, but it can be waited for
with a deadline, which is what turns a hang into a failure; the hung thread is a daemon, so it does
not keep the process alive once the run has failed (a library caller keeps it until it returns).
A subprocess could be killed, but the function would have to be picklable and its texts copied.
NaN and inf scores are numbers here: the rollout drops their rows (engine/stages/ppo/core.py
`finite_rows`) and a run of such iterations stops as diverged.
"""
from __future__ import annotations

import numbers
import threading
from typing import Callable

import torch

from ...errors import FusedRLError


class RewardFunctionError(FusedRLError):
    """The reward function raised, hung, or returned something other than one number per response."""


def call_reward_fn(fn: Callable, name: str, prompts: list[str], responses: list[str],
                   timeout_s: float) -> list[float]:
    """fn(prompts, responses) -> one float per response, checked; `name` (e.g. reward_fn's
    'module:function') names the function in errors."""
    outcome: dict = {}
    # Thread-local in torch and CUDA: the worker runs under the caller's grad mode and on its GPU
    # (under torchrun, the rank's own; a new thread would start on GPU 0 with gradients on).
    grad = torch.is_grad_enabled()
    gpu = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def call():
        try:
            if gpu is not None:
                torch.cuda.set_device(gpu)
            with torch.set_grad_enabled(grad):
                outcome["value"] = fn(prompts, responses)
        except BaseException as e:  # SystemExit and the like too: the user's code ends nothing but the run
            outcome["error"] = e

    worker = threading.Thread(target=call, name=f"reward function {name}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise RewardFunctionError(f"the reward function {name} did not return within reward.fn_timeout_s="
                                  f"{timeout_s:g} seconds (scoring {len(responses)} responses)")
    if "error" in outcome:
        error = outcome["error"]
        raise RewardFunctionError(f"the reward function {name} raised {type(error).__name__}: {error}") from error
    return checked_scores(outcome["value"], name, len(responses))


def checked_scores(values, name: str, count: int) -> list[float]:
    """`values` as floats when it is a list or tuple of `count` real numbers (not bools); anything
    else (a string, a tensor, an array, a generator, None) is refused, not coerced."""
    if not isinstance(values, (list, tuple)):
        raise RewardFunctionError(f"the reward function {name} returned {_shown(values)}: expected a list of "
                                  f"{count} numbers, one per response")
    if len(values) != count:
        raise RewardFunctionError(f"the reward function {name} returned {len(values)} scores for {count} responses")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardFunctionError(f"the reward function {name} returned {_shown(value)} as score {i}: expected "
                                      "a number (int or float)")
    return [float(v) for v in values]


def _shown(value) -> str:
    """A value's type and the start of its repr, for an error line."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"
