"""A bound on the time of a piece of pure-Python work that a user's file drives (a tokenizer's chat
template, a Jinja program that may loop without end): SIGALRM interrupts it where the interpreter
next checks for signals, so it ends with a one-line error instead of hanging the run."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class TimeLimitExceeded(Exception):
    """Raised inside the bounded block when its time is up."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Run the block for at most `seconds` of wall time (TimeLimitExceeded when it runs over). In
    the main thread only, where Python delivers signals; elsewhere the block runs unbounded. An
    outer timer or handler is put back as it was (the outer timer restarted with what it had
    left)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeLimitExceeded(f"took more than {seconds:g} seconds")

    previous = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, outer)
