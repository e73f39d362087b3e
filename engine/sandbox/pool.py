"""Many sandbox runs at once, at most `max_concurrent` of them: a reward over a batch of answers,
or several tool calls, without starting more interpreters than the machine has cores for."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

from .runner import SandboxResult, run_python


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

    def map(self, codes: Sequence[str], stdins: Optional[Sequence[Optional[str]]] = None,
            **options) -> list[SandboxResult]:
        """Runs every code (with its stdin when `stdins` is given), at most max_concurrent at
        once."""
        if stdins is not None and len(stdins) != len(codes):
            raise ValueError(f"SandboxPool.map: {len(stdins)} stdins for {len(codes)} codes")
        stdins = stdins if stdins is not None else [None] * len(codes)
        futures = [self._executor.submit(run_python, code, stdin=stdin, **options)
                   for code, stdin in zip(codes, stdins)]
        return [future.result() for future in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
