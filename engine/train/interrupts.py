"""SIGTERM and SIGINT during training: finish the step, save a checkpoint, stop.

A cluster scheduler ends a job with SIGTERM (then SIGKILL after a grace period) and a user with
Ctrl-C (SIGINT); killed mid-step, a run would lose every step since its last checkpoint. While the
training loop runs, `StopRequests` turns both signals into a request the loop reads at the next step
boundary: under torchrun every rank takes the largest request of all ranks (one all-reduce per
step), so they save the same checkpoint together even when the signal reached only some of them.
A second Ctrl-C stops at once, without saving (KeyboardInterrupt); any other repeated signal changes
nothing (a SIGTERM after Ctrl-C may be torchrun's agent passing the stop on).
"""
from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist

from ..parallel import distributed

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """A context manager: inside it SIGTERM and SIGINT set `received` (the signal's number) instead
    of ending the process; the handlers before it are put back on leaving. Outside the main thread
    (Python cannot handle signals there) it changes nothing."""

    def __init__(self, announce: bool = True):
        self.received = 0
        self.announce = announce  # say on stderr what happens next (rank 0)
        self._before: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._before = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._before.items():
            signal.signal(s, handler)
        self._before = {}

    def _handle(self, signum: int, _frame) -> None:
        if self.received:
            if signum == signal.SIGINT and self.received == signal.SIGINT:
                raise KeyboardInterrupt  # Ctrl-C twice: stop now, without saving
            return
        self.received = signum
        if self.announce:
            name = signal.Signals(signum).name
            again = " (Ctrl-C again stops at once, without saving)" if name == "SIGINT" else ""
            print(f"fusedrl: {name} received: finishing this step, then saving a checkpoint and "
                  f"stopping{again}", file=sys.stderr, flush=True)

    def agreed(self) -> int:
        """The signal every rank stops for (the largest number any rank received; 0: none): a
        collective under torchrun, so every rank calls it at the same step boundary. Over the whole
        world, not a data group: a tensor group's ranks save together too."""
        if distributed.world_size() == 1:
            return self.received
        flag = torch.tensor(self.received, dtype=torch.int64)  # a CPU tensor: gloo reduces it
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)
