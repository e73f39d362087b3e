"""Callbacks of a training run: code of the program that embeds fusedrl, called by the loop
(loop.py) after each step, each logged train record, each checkpoint and each evaluation.

A callback is a `Callback` (override any of on_step, on_log, on_save, on_evaluate; any of them
returning True stops the run) or any object with some of those methods, a transformers
`TrainerCallback` or an object with its on_step_end (its on_step_end, on_log, on_save, on_evaluate
where it has them, with `args`, a TrainerState and a TrainerControl whose should_training_stop
stops the run), or a plain function, called as on_step. A stop ends the run cleanly at that step
boundary: a checkpoint is saved there and the stage exports its model as after its last step.
Under torchrun the ranks stop together (any rank's stop stops all).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import UsageError

EVENTS = ("on_step", "on_log", "on_save", "on_evaluate")
# transformers' TrainerCallback hook for each of ours
HF_EVENTS = {"on_step": "on_step_end", "on_log": "on_log", "on_save": "on_save",
             "on_evaluate": "on_evaluate"}


class Callback:
    """Override what you need; return True to stop the run after this step."""

    def on_step(self, step: int, metrics: dict) -> Optional[bool]:
        """After each step: `step` counts the steps done (1 after the first), `metrics` its
        metrics (loss or score, ...; the loop's own timing only on logged steps)."""

    def on_log(self, step: int, metrics: dict) -> Optional[bool]:
        """After each train record written to metrics.jsonl (every train.log_every steps)."""

    def on_save(self, step: int, checkpoint: Path) -> Optional[bool]:
        """After a checkpoint of `step` was saved in directory `checkpoint`."""

    def on_evaluate(self, step: int, metrics: dict) -> Optional[bool]:
        """After an evaluation at `step` (its metrics)."""


class Methods(Callback):
    """An object with some of Callback's methods (not a subclass): those it has are called."""

    def __init__(self, target):
        self.target = target

    def _call(self, event: str, step: int, payload):
        method = getattr(self.target, event, None)
        return method(step, payload) if method is not None else None

    def on_step(self, step, metrics):
        return self._call("on_step", step, metrics)

    def on_log(self, step, metrics):
        return self._call("on_log", step, metrics)

    def on_save(self, step, checkpoint):
        return self._call("on_save", step, checkpoint)

    def on_evaluate(self, step, metrics):
        return self._call("on_evaluate", step, metrics)


class StepFunction(Callback):
    """A plain function fn(step, metrics) as a callback's on_step."""

    def __init__(self, fn):
        self.fn = fn

    def on_step(self, step, metrics):
        return self.fn(step, metrics)


class TransformersCallback(Callback):
    """A transformers TrainerCallback driven by our loop: `args` (the run's config) and one
    TrainerState (global_step, max_steps, log_history) and TrainerControl across the run."""

    def __init__(self, callback, args, total_steps: int):
        from transformers import TrainerControl, TrainerState
        self.callback, self.args = callback, args
        self.state = TrainerState(max_steps=total_steps)
        self.control = TrainerControl()

    def _call(self, event: str, step: int, **kwargs) -> bool:
        self.state.global_step = step
        method = getattr(self.callback, HF_EVENTS[event], None)
        if method is not None:
            method(self.args, self.state, self.control, **kwargs)
        return bool(self.control.should_training_stop)

    def on_step(self, step, metrics):
        return self._call("on_step", step)

    def on_log(self, step, metrics):
        self.state.log_history.append({**metrics, "step": step})
        return self._call("on_log", step, logs=metrics)

    def on_save(self, step, checkpoint):
        return self._call("on_save", step)

    def on_evaluate(self, step, metrics):
        return self._call("on_evaluate", step, metrics=metrics)


def as_callback(callback, args, total_steps: int) -> Callback:
    """`callback` as a Callback (see the module docstring); a UsageError for anything else."""
    if isinstance(callback, Callback):
        return callback
    if hasattr(callback, "on_step_end"):  # transformers' name: a TrainerCallback or its shape
        return TransformersCallback(callback, args, total_steps)
    if any(hasattr(callback, name) for name in EVENTS):
        return Methods(callback)
    if callable(callback):
        return StepFunction(callback)
    raise UsageError(f"callbacks: {callback!r} is not a callback: expected a "
                     "fusedrl.engine.Callback, a transformers TrainerCallback or a function "
                     "fn(step, metrics)")


class Callbacks:
    """The run's callbacks, called in order; each event says whether the run stops (agreed over
    the ranks)."""

    def __init__(self, callbacks=(), args=None, total_steps: int = 0):
        self.callbacks = [as_callback(c, args, total_steps) for c in callbacks]

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def fire(self, event: str, step: int, payload) -> bool:
        """Call every callback's `event` (one of EVENTS); True: one of them stops the run."""
        if not self.callbacks:  # the same on every rank: the collective below is skipped by all
            return False
        from ..parallel import distributed  # torch: not imported with the trainers' API
        stop = False
        for callback in self.callbacks:
            stop = bool(getattr(callback, event)(step, payload)) or stop
        return distributed.max_over_ranks(int(stop)) > 0
