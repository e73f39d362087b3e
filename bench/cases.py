"""A case (one claim at one shape, its implementations' rows), and how the runner runs one: its
time budget bounds its timed repetitions (timing.case_budget: a case whose setup or compile ran
long still gets its first measurement), a hard limit (the run's deadline: a SIGALRM timer) stops
it; its rows given their spread (median, p20, p80, n) and its seconds split into setup_s,
compile_s (warm-up: compile and autotune) and measure_s (the timed loops), from the ledger
(timing.py) kept while it runs."""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from typing import Callable, Iterable, Iterator

from . import results, timing

NOT_RUN_TIME = "not run: time"


@dataclasses.dataclass(frozen=True)
class Case:
    """suite, name (shape included); impls: the rows it gives, named before it runs (the rows a
    case that does not run says so for); measure: its rows, each yielded the moment it is
    measured; shares: the keys of Context.shared it reads (what the case before it made and may
    keep for it; everything else is released before it starts); model_paths: its fusedrl rows run
    the model-scale paths (a decoder, generation, the sampler, paged attention:
    dispatch.model_backend), which keep CPU tensors on the PyTorch backend even when the
    interpreter is asked for."""
    suite: str
    name: str
    impls: tuple[str, ...]
    measure: Callable[[], Iterable[dict]]
    shares: tuple[str, ...] = ()
    model_paths: bool = False


class CaseTimeout(BaseException):
    """A case ran past its budget (raised by the timer inside it). Not an Exception: the measuring
    code's own `except Exception` (a peer that cannot run is a row, not the end) lets it through."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """CaseTimeout inside the block after `seconds` (None, or outside the main thread: none)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"past {seconds:.0f} s")

    before = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def not_run(case: Case, impls, status: str) -> list[dict]:
    """The rows of `impls` of a case that gave none: status says why, no figures."""
    return [results.missing_row(case.suite, case.name, impl, status, "not measured")
            for impl in impls]


class _Phases:
    """Splits a case's seconds over its rows: a row whose seconds are one loop's median takes that
    loop's spread, warm-up and loop seconds; any other row the case's seconds not yet given to a
    row (compile: warm-ups; measure: loops, else the row's own seconds, n 1). setup_s: the rest."""

    def __init__(self, book: timing.Ledger):
        self.book, self.start = book, time.perf_counter()
        self.given_compile = self.given_measure = self.given_setup = 0.0

    def attach(self, row: dict) -> dict:
        seconds = row.get("seconds")
        if row.get("status") != "ok" or seconds is None:
            return row
        loop = self.book.matching(seconds)
        if loop is not None:
            compile_s, measure_s = loop.warmup_s, loop.measure_s
            row.update(loop.figures())
        else:  # a figure of its own (a sum of loops with its spread, or one timed run)
            compile_s = max(self.book.compile_s() - self.given_compile, 0.0)
            measure_s = max(self.book.measure_s() - self.given_measure, 0.0) or seconds
            if "seconds_p20" not in row:
                row.update(timing.Timing.of([seconds]).figures())
        self.given_compile += compile_s
        self.given_measure += measure_s
        # Setup: what neither the ledger holds nor a row was given (a row timed outside any loop
        # gives its own seconds as measure_s, which the ledger never saw).
        spent = time.perf_counter() - self.start
        accounted = (max(self.book.compile_s(), self.given_compile)
                     + max(self.book.measure_s(), self.given_measure) + self.given_setup)
        setup = max(spent - accounted, 0.0)
        self.given_setup += setup
        row.update(setup_s=round(setup, 4), compile_s=round(compile_s, 4),
                   measure_s=round(measure_s, 4))
        return row


def run_case(case: Case, budget_s: float | None, emit: Callable[[dict], None],
             limit_s: float | None = None, limit: str = "the run's deadline") -> None:
    """Run `case`, emit(row) for each row as it comes: budget_s bounds its timed repetitions
    (once spent, each loop still times one call), limit_s stops it (`limit` names what that is);
    an implementation the case did not reach gets a row saying why (the time, or the error that
    stopped the case)."""
    done: set[str] = set()
    with timing.ledger() as book, timing.case_budget(budget_s):
        phases = _Phases(book)
        try:
            with time_limit(limit_s):
                for row in case.measure():
                    done.add(row["impl"])
                    emit(phases.attach(row))
        except CaseTimeout:
            status = f"{NOT_RUN_TIME} ({limit}, {limit_s:.0f} s)"
            for row in not_run(case, [i for i in case.impls if not _reached(i, done)], status):
                emit(row)
        except Exception as error:  # one case's failure is its rows' status, not the run's end
            status = f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}" \
                if str(error) else f"error: {type(error).__name__}"
            for row in not_run(case, [i for i in case.impls if not _reached(i, done)], status):
                emit(row)


def _reached(impl: str, done: set[str]) -> bool:
    """Whether a case's listed `impl` gave a row: one of that name, or for a one-word name (a
    peer's, "trl") one whose first word it is ("trl 1.16.0", "fusedrl cuda"). A listed name of
    several words ("fusedrl CUDA graph") is reached only by itself."""
    return impl in done or (" " not in impl and any(d.split()[0] == impl for d in done))
