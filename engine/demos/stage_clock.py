"""Where a demo's wall time went: seconds by stage (setup, SFT, reward model, RL, evaluations),
so one run on a fresh GPU machine says which stage its time went to, not only its total.

Each second is counted once: a stage entered inside another (the accuracy evaluations PPO runs
every few iterations) pauses the outer one, so the stages add up to the time spent in any of them.
No device sync is added: every stage ends reading a result back to the host (a checkpoint written,
an accuracy counted), which waits for the GPU's work anyway.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator


class StageClock:
    """`with clock.stage("sft"): ...`; `clock.seconds` = {stage: wall seconds, nested stages'
    seconds excluded}, in the order the stages were first entered; `clock.total()`: the seconds
    since the clock was made (the demo's wall time). `now`: the clock read (time.perf_counter)."""

    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self.seconds: dict[str, float] = {}
        self._now = now
        self._open: list[str] = []
        self._start = self._since = now()

    def total(self) -> float:
        return self._now() - self._start

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._charge()
        self.seconds.setdefault(name, 0.0)
        self._open.append(name)
        try:
            yield
        finally:
            self._charge()
            self._open.pop()

    def _charge(self) -> None:
        """The seconds since the last reading to the innermost open stage, if any."""
        now = self._now()
        if self._open:
            self.seconds[self._open[-1]] += now - self._since
        self._since = now
