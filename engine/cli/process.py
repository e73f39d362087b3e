"""What the `fusedrl` command sets in its own process before a command runs: how SIGINT is taken,
and the CPU's OpenMP defaults. Torch-free: the OpenMP runtime reads its variables once, when torch
loads it, which no command does before its arguments are parsed."""
from __future__ import annotations

import contextlib
import os
import signal
import threading

# OpenMP threads that find no work spin (the ACTIVE policy, GNU OpenMP's default) at each op's
# barrier; a thread whose core another process holds is descheduled there, and every small op then
# waits a time slice for it. On 2 CPU cores beside one busy process, 3,000 small matmuls took 7.99 s
# on two torch threads against 0.42 s on one, and 0.55 s with PASSIVE (threads sleep at the
# barrier): docs/agents.md has the demos' figures.
CPU_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def set_cpu_defaults(environ=os.environ) -> dict:
    """CPU_DEFAULTS in `environ` where the user set nothing (a value the user gave is kept); returns
    what was set. Effective only before torch is imported (the OpenMP runtime reads it then)."""
    added = {k: v for k, v in CPU_DEFAULTS.items() if k not in environ}
    environ.update(added)
    return added


@contextlib.contextmanager
def interruptible():
    """Inside, SIGINT raises KeyboardInterrupt (Python's default), also in a process started with
    SIGINT ignored (a shell script's background job: `fusedrl ppo ... &`, or nohup): `kill -INT`
    then stops any command as Ctrl-C does, and a training loop at its step boundary with its
    checkpoint saved (engine/train/interrupts.py takes SIGINT over while it runs). The handler
    before is put back on leaving. Outside the main thread (Python handles signals there only) it
    changes nothing."""
    main = threading.current_thread() is threading.main_thread()
    ignored = main and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
