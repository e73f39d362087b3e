"""The trainer's handle on one trajectory's environment, as rollout.env_isolation says: 'process'
(a worker process of its own, env_worker.py) or 'thread' (in the trainer, each call in a daemon
thread). Both give reset(timeout_s) and step(message, timeout_s), checked (environment.py), and
raise EnvironmentFailure, or EnvTimeout past the timeout; close() ends what is left."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Callable

from .environment import EnvironmentFailure, checked_messages, checked_step
from .sources import EnvSource

# The least time a worker has to start and import the environment's module (an interpreter's start
# takes seconds on a loaded machine; rollout.env_timeout_s bounds the environment's own calls).
LOAD_TIMEOUT_S = 60.0
_POLL_S = 0.1  # how often a waiting trainer looks whether the worker is still alive
# A reply's JSON holds at most 12 bytes per character of its messages (an astral character is
# escaped as two \uXXXX), plus its keys and names.
_REPLY_SLACK = 1 << 20


class EnvTimeout(EnvironmentFailure):
    """An environment call still running at rollout.env_timeout_s."""


class ProcessEnvironment:
    """One trajectory's environment in a worker process, spawned now (call from the thread that
    outlives the rollout: the worker dies with the thread that spawned it)."""

    def __init__(self, source: EnvSource, row: dict, max_chars: int):
        self.name, self.max_chars = source.name, max_chars
        ours, theirs = socket.socketpair()
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", __package__ + ".env_worker", str(theirs.fileno()),
                 str(os.getpid())], pass_fds=(theirs.fileno(),), start_new_session=True,
                stdin=subprocess.DEVNULL)
        self.conn = Connection(ours.detach())
        self.conn.send_bytes(json.dumps({"source": dataclasses.asdict(source), "row": row,
                                         "sys_path": sys.path, "max_chars": max_chars},
                                        default=str).encode())
        self.loaded = False

    def reset(self, timeout_s: float) -> list[dict]:
        if not self.loaded:
            self._reply(time.monotonic() + max(timeout_s, LOAD_TIMEOUT_S), "loading")
            self.loaded = True
        reply = self._call({"call": "reset"}, timeout_s, "reset()")
        return checked_messages(reply.get("messages"), "reset()", self.max_chars)

    def step(self, message: dict, timeout_s: float) -> tuple[list[dict], float, bool]:
        reply = self._call({"call": "step", "message": message}, timeout_s, "step()")
        return checked_step((reply.get("messages"), reply.get("reward"), reply.get("done")),
                            "step()", self.max_chars)

    def _call(self, request: dict, timeout_s: float, what: str) -> dict:
        try:
            self.conn.send_bytes(json.dumps(request).encode())
        except OSError:  # the worker is gone: its exit status says how
            pass
        return self._reply(time.monotonic() + timeout_s, what, timeout_s)

    def _reply(self, deadline: float, what: str, timeout_s: float | None = None) -> dict:
        """The worker's next reply by `deadline`, or the worker killed and EnvTimeout raised; an
        ended worker or an {"error"} reply is an EnvironmentFailure."""
        while self.process is not None:
            if wait([self.conn], timeout=max(0.0, min(deadline - time.monotonic(), _POLL_S))):
                try:
                    reply = json.loads(self.conn.recv_bytes(12 * self.max_chars + _REPLY_SLACK))
                except (EOFError, OSError, ValueError) as e:  # gone, or a reply too big or broken
                    if not isinstance(e, EOFError):
                        self.close()
                        raise EnvironmentFailure(f"{what} sent an unreadable reply ({e})") from None
                    self._wait_exit()
                else:
                    if "error" in reply:
                        raise EnvironmentFailure(str(reply["error"]))
                    return reply
            if self.process.poll() is not None:
                code = self.process.returncode
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                self.close()
                raise EnvironmentFailure(f"{what} ended the environment's worker process ({how})")
            if time.monotonic() >= deadline:
                self.close()
                limit = (f"rollout.env_timeout_s={timeout_s:g} s" if timeout_s is not None
                         else f"{LOAD_TIMEOUT_S:g} s of loading")
                raise EnvTimeout(f"{what} did not return within {limit}")
        raise EnvironmentFailure(f"{what}: the environment's worker process was ended before")

    def _wait_exit(self) -> None:
        try:
            self.process.wait(1.0)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Kill the worker and every process it started (its process group), and reap it."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.conn.close()
        self.process = self.conn = None


class ThreadEnvironment:
    """One trajectory's environment in the trainer (rollout.env_isolation=thread), each call in a
    daemon thread: a call past its timeout cannot be stopped and is left running."""

    def __init__(self, make_env: Callable[[dict], object], row: dict, max_chars: int,
                 name: str = "the environment"):
        self.make_env, self.row, self.max_chars, self.name = make_env, row, max_chars, name
        self.env = None

    def reset(self, timeout_s: float) -> list[dict]:
        def start():
            self.env = self.make_env(self.row)
            return checked_messages(self.env.reset(), "reset()", self.max_chars)
        return _in_thread(start, timeout_s, "reset()")

    def step(self, message: dict, timeout_s: float) -> tuple[list[dict], float, bool]:
        return _in_thread(lambda: checked_step(self.env.step(dict(message)), "step()",
                                               self.max_chars), timeout_s, "step()")

    def close(self) -> None:
        self.env = None


def _in_thread(call: Callable, timeout_s: float, what: str):
    """call() in a daemon thread under `timeout_s`: its value, EnvTimeout, or EnvironmentFailure."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as e:  # SystemExit too: the user's code ends its trajectory, no more
            outcome["error"] = e
    worker = threading.Thread(target=run, name=f"environment {what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise EnvTimeout(f"{what} did not return within rollout.env_timeout_s={timeout_s:g} s")
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, EnvironmentFailure):
            raise error
        raise EnvironmentFailure(f"{what} raised {type(error).__name__}: {error}")
    return outcome["value"]
