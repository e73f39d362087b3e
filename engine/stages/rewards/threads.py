"""reward.isolation=thread: a reward function in the trainer's own process, one thread per call.

The call is waited for with a deadline, which turns a hang that releases the GIL into a failure;
the hung thread is a daemon, so it does not keep the process alive once the run has failed. What
a thread cannot contain is the reason the default is a worker process (workers.py): a function
holding the GIL (a catastrophic regex, a long C loop) is never stopped and Ctrl-C waits for it,
`os._exit` ends the trainer, and a changed directory, environment or signal handler is the
trainer's. What it gives: no process start, and the trainer's torch state (grad mode, GPU) in
the function.
"""
from __future__ import annotations

import threading
import time

import torch

from .functions import (FunctionSource, RewardCaller, RewardFunctionError, RewardInputs,
                        load_function, timed_out)


class ThreadRunner:
    """Runs one reward function in a thread per call: start(inputs), then result(deadline)."""

    def __init__(self, source: FunctionSource, timeout_s: float):
        self.name, self.timeout_s = source.name, timeout_s
        self.caller = RewardCaller(load_function(source), source.name)
        self.thread, self.outcome, self.rows = None, {}, 0

    def start(self, inputs: RewardInputs, payload: bytes | None = None) -> None:
        """Begin scoring `inputs` (payload: the pickled inputs a process would read; unused)."""
        outcome: dict = {}
        # Thread-local in torch and CUDA: the call runs under the caller's grad mode and on its GPU
        # (under torchrun, the rank's own; a new thread would start on GPU 0 with gradients on).
        grad = torch.is_grad_enabled()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        gpu = torch.cuda.current_device() if cuda else None

        def call():
            try:
                if gpu is not None:
                    torch.cuda.set_device(gpu)
                with torch.set_grad_enabled(grad):
                    outcome["value"] = self.caller(inputs)
            except BaseException as e:  # the caller's own RewardFunctionError, or torch's
                outcome["error"] = e

        self.thread = threading.Thread(target=call, name=f"reward function {self.name}",
                                       daemon=True)
        self.outcome, self.rows = outcome, len(inputs.completion_ids)
        self.thread.start()

    def result(self, deadline: float) -> list:
        """The scores, or a RewardFunctionError when the call raised or is still running at
        `deadline` (time.monotonic())."""
        self.thread.join(max(0.0, min(deadline - time.monotonic(), threading.TIMEOUT_MAX)))
        if self.thread.is_alive():
            raise timed_out(self.name, self.timeout_s, self.rows)
        if "error" in self.outcome:
            error = self.outcome["error"]
            if isinstance(error, RewardFunctionError):
                raise error
            raise RewardFunctionError(f"the reward function {self.name} raised "
                                      f"{type(error).__name__}: {error}") from error
        return self.outcome["value"]

    @property
    def busy(self) -> bool:
        """Whether a call is running."""
        return self.thread is not None and self.thread.is_alive()

    def abandon(self) -> None:
        """Forget a call still running (its daemon thread cannot be stopped)."""
        self.thread = None

    def close(self) -> None:
        self.abandon()
