"""Timed loops with their spread, and the ledger a `fusedrl bench` run keeps of them.

`measure(fn, device)` runs fn once to warm up (compiling, autotuning, allocator growth), then
repeats it until a time budget is spent: a Timing holds the median, the 20th and 80th percentiles
and the count of the repeated calls, and the seconds of the warm-up and of the loop. While a
ledger is open (`ledger()`, the runner's, around each case) every Timing and every `warm_up()`
block is also noted there, so the runner splits a case's seconds into setup, compile and measure
and gives each row the spread of the loop its figure came from. While a case's budget is open
(`case_budget()`, the runner's), each loop's repetitions stop at its end, and a loop that starts
after it times one call: the budget bounds the repetitions, never the first measurement.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Callable, Iterator

import torch

from . import ranks


@dataclasses.dataclass(frozen=True)
class Timing:
    """One timed loop: seconds per call (median, p20, p80) over n calls; warmup_s: the first call
    (compile and autotune included); measure_s: the loop's wall seconds."""
    median_s: float
    p20_s: float
    p80_s: float
    n: int
    warmup_s: float = 0.0
    measure_s: float = 0.0
    best_s: float = 0.0  # the fastest call (what a limit, the machine's best, is taken from)

    @classmethod
    def of(cls, samples: list[float], warmup_s: float = 0.0, measure_s: float | None = None):
        """The Timing of per-call seconds `samples` (at least one)."""
        ordered = sorted(samples)
        if len(ordered) == 1:
            low = high = ordered[0]
        else:
            cuts = statistics.quantiles(ordered, n=5, method="inclusive")
            low, high = cuts[0], cuts[3]
        total = sum(ordered) if measure_s is None else measure_s
        return cls(statistics.median(ordered), low, high, len(ordered), warmup_s, total,
                   ordered[0])

    def figures(self, key: str = "seconds") -> dict:
        """The row's figures: key (the median), key_p20, key_p80 and n."""
        return {key: self.median_s, f"{key}_p20": self.p20_s, f"{key}_p80": self.p80_s,
                "n": self.n}


@dataclasses.dataclass
class Ledger:
    """What a case spent: its loops' Timings and its explicit warm-ups' seconds."""
    timings: list[Timing] = dataclasses.field(default_factory=list)
    warmups_s: list[float] = dataclasses.field(default_factory=list)

    def compile_s(self) -> float:
        return sum(t.warmup_s for t in self.timings) + sum(self.warmups_s)

    def measure_s(self) -> float:
        return sum(t.measure_s for t in self.timings)

    def matching(self, seconds: float) -> Timing | None:
        """The loop whose median is `seconds` (a row's figure taken from it), or None."""
        return next((t for t in reversed(self.timings)
                     if abs(t.median_s - seconds) <= 1e-6 * max(seconds, 1e-9) + 1e-9), None)


_open: list[Ledger] = []
_budget_ends: list[float] = []  # perf_counter() at which each open case budget is spent


@contextlib.contextmanager
def case_budget(seconds: float | None) -> Iterator[None]:
    """A case's budget for its timed repetitions (None: none), from now."""
    _budget_ends.append(float("inf") if seconds is None else time.perf_counter() + seconds)
    try:
        yield
    finally:
        _budget_ends.pop()


def budget_left() -> float | None:
    """Seconds left of the innermost case budget (None outside one, or with none)."""
    if not _budget_ends or _budget_ends[-1] == float("inf"):
        return None
    return _budget_ends[-1] - time.perf_counter()


@contextlib.contextmanager
def ledger() -> Iterator[Ledger]:
    """Note every Timing and warm-up inside (innermost ledger only)."""
    book = Ledger()
    _open.append(book)
    try:
        yield book
    finally:
        _open.remove(book)


@contextlib.contextmanager
def warm_up() -> Iterator[None]:
    """A block that compiles or warms up (its seconds are the case's compile_s, not measured)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        note_warm_up(time.perf_counter() - start)


def note_warm_up(seconds: float) -> None:
    """Put the seconds of a warm-up timed elsewhere (a first iteration) in the open ledger."""
    if _open:
        _open[-1].warmups_s.append(seconds)


def note(timing: Timing) -> Timing:
    """Put a Timing measured elsewhere (e.g. one timed iteration) in the open ledger."""
    if _open:
        _open[-1].timings.append(timing)
    return timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, min_reps: int = 3,
            budget_s: float = 1.0, max_reps: int = 200) -> Timing:
    """fn timed after one warm-up call: at least min_reps calls, more until budget_s or max_reps
    (CUDA events around each call on a GPU, wall time on the CPU); budget_s cut to what is left of
    the case's budget (case_budget), min_reps 1 once that is spent. Under torchrun the count is
    agreed before the loop goes on (ranks.py): fn may issue collectives."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    left = budget_left()
    if left is not None:
        budget_s = min(budget_s, max(left, 0.0))
        # one call once it is spent; not under torchrun, where every rank must make the same calls
        min_reps = min_reps if left > 0 or ranks.several() else 1
    samples, start = [], time.perf_counter()
    while len(samples) < min_reps or (not ranks.several() and len(samples) < max_reps
                                      and time.perf_counter() - start < budget_s):
        samples.append(_timed_call(fn, device))
    if ranks.several():  # each rank's choice from its first calls; every rank runs the fewest
        fits = int(budget_s / max(statistics.median(samples), 1e-9))
        for _ in range(ranks.agreed_count(max(min(fits, max_reps), min_reps)) - len(samples)):
            samples.append(_timed_call(fn, device))
    return note(Timing.of(samples, warmup_s, time.perf_counter() - start))


def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """One call's seconds (CUDA events around it on a GPU, wall time on the CPU)."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin
