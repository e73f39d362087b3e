"""The check of a checkpoint's loop state before a run resumes from it: every field one of the
stage's loop-state dataclass with the type of its default (counters ints >= 0, floats finite, the
nested positions alike), the step the one the checkpoint's directory is named by and within the
run's length. A state that fails is corrupt (the checkpoint is set aside like one with a bad
tensor file, engine/train/checkpoint/store.py:resume); a step past the run's length is refused
in one line instead (the run was made shorter: its checkpoints are kept)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

from ..runs.durable import CorruptDirectory
from ..errors import UsageError
from .checkpoint.store import PREFIX, STATE_FILE


def loop_state_check(state, skips, total: int) -> Callable[[Path, object], None]:
    """check(checkpoint path, saved loop state) for resuming the dataclass `state` of a run of
    `total` steps; the saved state holds its fields and, under "loop", those of `skips`."""
    expected = {**dataclasses.asdict(state), "loop": dataclasses.asdict(skips)}

    def check(path: Path, saved) -> None:
        problem = _problem(saved, expected, "")
        if problem is None and saved.get("step") != int(path.name.removeprefix(PREFIX)):
            problem = f"step={saved.get('step')!r} in a checkpoint named {path.name}"
        if problem is not None:
            raise CorruptDirectory(f"{path / STATE_FILE}: its loop state has {problem}")
        if saved["step"] > total:
            raise UsageError(f"checkpoint {path} is at step {saved['step']}, past this run's "
                             f"{total} steps: raise the run's length (train.max_steps, "
                             "train.epochs or train.iterations) to continue it, or start the new "
                             "run in another output_dir")
    return check


def _problem(saved, expected: dict, where: str) -> str | None:
    """What is wrong with `saved` against the defaults `expected` (a field unknown or of another
    type, a negative count, a non-finite number), None when nothing is."""
    if not isinstance(saved, dict):
        return f"{where or 'the state'} of type {type(saved).__name__}, expected a mapping"
    for key, value in saved.items():
        name = f"{where}{key}"
        if key not in expected:
            if expected:
                return f"an unknown field {name!r}"
            if not _finite(value):  # an open mapping of numbers (PPO's running moments)
                return f"{name}={value!r}, expected a finite number"
            continue
        default = expected[key]
        if isinstance(default, dict):
            problem = _problem(value, default, f"{name}.")
        else:
            ok, wanted = _matches(value, default)
            problem = None if ok else f"{name}={value!r}, expected {wanted}"
        if problem is not None:
            return problem
    return None


def _matches(value, default) -> tuple[bool, str]:
    """Whether `value` may stand where the loop state's `default` is, and what is expected there."""
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return type(value) is type(default), f"a {type(default).__name__}"
    if isinstance(default, int):
        return type(value) is int and value >= 0, "an int >= 0"
    return _finite(value), "a finite number"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
