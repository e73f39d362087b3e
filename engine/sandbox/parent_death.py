"""Worker processes that never outlive the trainer: Linux's PR_SET_PDEATHSIG for the `python -m`
workers the trainer starts (reward functions in engine/stages/rewards/workers.py, environments in
engine/agents/env_worker.py). It lives in the sandbox, the layer that owns the processes the
trainer runs user and model code in, so both workers' packages import it from below."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with(parent_pid: int) -> None:
    """Have Linux SIGKILL this process when the trainer dies, however it dies (the signal follows
    the thread that spawned us: the one that opened the worker); elsewhere the worker ends when
    its pipe closes, once it is idle. parent_pid: the trainer's pid, as it passed it to us."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the trainer died before prctl: nobody is left to serve
        os._exit(1)
