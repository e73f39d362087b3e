"""Many sandbox runs at once, at most `max_concurrent` of them: a reward over a batch of answers,
or several tool calls, without starting more interpreters than the machine has cores for."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence, Union

from .runner import SandboxResult, run_python

# A run that would have less than this before the batch's deadline is not started.
_LEAST_S = 0.05


class SandboxPool:
    """`pool.map(codes, **run_options)` -> one SandboxResult per code, in order."""

    def __init__(self, max_concurrent: Optional[int] = None):
        count = max_concurrent or max(1, min(8, os.cpu_count() or 1))
        if count < 1:
            raise ValueError(f"SandboxPool: max_concurrent={max_concurrent!r}, expected >= 1")
        self._executor = ThreadPoolExecutor(max_workers=count, thread_name_prefix="sandbox")

    def run(self, code: str, **options) -> SandboxResult:
        """One run (waits for a free place)."""
        return self._executor.submit(run_python, code, **options).result()

    def map(self, codes: Sequence[str], stdins: Optional[Sequence[Optional[str]]] = None, *,
            timeout_s: Union[float, Sequence[float]] = 10.0, deadline: Optional[float] = None,
            **options) -> list[Optional[SandboxResult]]:
        """Runs every code (with its stdin when `stdins` is given; `timeout_s` one for all or one
        per code), at most max_concurrent at once. With `deadline` (time.monotonic()) every run
        ends by then: a run is given what is left of the time when it starts, and one not started
        in time is None."""
        if stdins is not None and len(stdins) != len(codes):
            raise ValueError(f"SandboxPool.map: {len(stdins)} stdins for {len(codes)} codes")
        stdins = stdins if stdins is not None else [None] * len(codes)
        timeouts = [timeout_s] * len(codes) if isinstance(timeout_s, (int, float)) else timeout_s
        if len(timeouts) != len(codes):
            raise ValueError(f"SandboxPool.map: {len(timeouts)} timeouts for {len(codes)} codes")

        def run(code, stdin, timeout):
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout < _LEAST_S:
                    return None
            return run_python(code, stdin=stdin, timeout_s=timeout, **options)

        futures = [self._executor.submit(run, code, stdin, timeout)
                   for code, stdin, timeout in zip(codes, stdins, timeouts)]
        return [future.result() for future in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
