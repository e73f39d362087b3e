"""reward.isolation=process (the default): a reward function in a spawned worker process of its own.

The worker is started once and reused for every call; each call is one message each way (the
batch pickled once, the scores back as JSON: the trainer unpickles nothing a user's code wrote).
What the process boundary buys:
- a call past reward.fn_timeout_s is ended by SIGKILL whatever it holds (the GIL in a catastrophic
  regex, a C loop), and a fresh worker is started for the next call;
- a worker that exits (`os._exit(0)` included), crashes or is killed fails the call, naming the
  function: the trainer's exit code is never the function's;
- a changed directory, environment or signal handler stays in the worker;
- Ctrl-C and SIGTERM reach the trainer alone (the worker has a session of its own and ignores
  SIGINT), and the trainer never leaves a worker behind: it kills its workers when it closes them
  or exits, and Linux kills them when the trainer dies (PR_SET_PDEATHSIG).
The worker is a fresh interpreter (`python -m` this module: nothing of the trainer's memory is
inherited, and the trainer's main script is not run again), which imports the function by module
path with the trainer's sys.path: a callable must be a top-level function of an importable module.
"""
from __future__ import annotations

import atexit
import glob
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection, wait
from typing import Callable

from ...errors import FusedRLError, UsageError
from ...sandbox.parent_death import die_with
from ...sandbox.run_cgroup import RunCgroup
from ...sandbox.runner import work_dir_prefix
from .functions import (FunctionSource, RewardCaller, RewardFunctionError, RewardInputs,
                        checked_scores, load_function, timed_out)

# The least time a worker has to start and import the function's module: spawning an interpreter
# and importing torch take seconds on a loaded machine, and reward.fn_timeout_s bounds one call.
LOAD_TIMEOUT_S = 60.0
_POLL_S = 0.1  # how often a waiting trainer looks whether the worker is still alive


class ProcessRunner:
    """One reward function in a worker process: start(inputs, payload), then result(deadline)."""

    def __init__(self, source: FunctionSource, timeout_s: float):
        self.source, self.name, self.timeout_s = source, source.name, timeout_s
        self.process = self.conn = None
        self.rows, self.busy = 0, False  # busy: a call sent and not answered

    def spawn(self) -> None:
        """Start the worker, which loads the function (wait_loaded waits for it)."""
        if getattr(self.source.fn, "__module__", None) == "__main__":
            raise UsageError(f"the reward function {self.name} is defined in the main script, "
                             "which a worker process does not run: move it to a module, or set "
                             "reward.isolation=thread")
        try:
            source = pickle.dumps((self.name, sys.path, pickle.dumps(self.source)))
        except Exception as e:  # a lambda or a local function: nothing the worker could import
            raise UsageError(f"the reward function {self.name} cannot be sent to a worker process "
                             f"({type(e).__name__}: {e}): define it at the top level of an "
                             "importable module, or set reward.isolation=thread") from None
        ours, theirs = socket.socketpair()
        with theirs:
            # A session of its own: the terminal's Ctrl-C goes to the trainer alone.
            self.process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),), start_new_session=True, stdin=subprocess.DEVNULL)
        self.conn = Connection(ours.detach())
        atexit.register(self.close)
        self.conn.send_bytes(source)

    def wait_loaded(self) -> None:
        """Wait until the worker has loaded the function: a usage error or failure naming it when
        it cannot (not importable, its module raised), within max(reward.fn_timeout_s,
        LOAD_TIMEOUT_S)."""
        limit = max(self.timeout_s, LOAD_TIMEOUT_S)
        reply = self._reply(time.monotonic() + limit, "loading it", lambda: RewardFunctionError(
            f"the reward function {self.name} was not loaded in its worker process within "
            f"{limit:g} seconds"))
        if "error" in reply:
            self.close()
            usage = reply.get("exit_code") == UsageError.exit_code
            raise (UsageError if usage else FusedRLError)(reply["error"])

    def start(self, inputs: RewardInputs, payload: bytes) -> None:
        """Send the batch (`payload`: `inputs` pickled) to the worker (started first if none)."""
        if self.process is None:
            self.spawn()
            self.wait_loaded()
        self.rows, self.busy = len(inputs.completion_ids), True
        try:
            self.conn.send_bytes(payload)
        except OSError:  # the worker is gone (a broken pipe): say how it ended
            self._wait_exit()
            raise self._ended(f"scoring {self.rows} responses") from None

    def result(self, deadline: float) -> list:
        """The scores of the call started, or a RewardFunctionError when it raised, returned
        something else than scores, ended the worker, or is still running at `deadline`
        (time.monotonic(); the worker is then killed)."""
        reply = self._reply(deadline, f"scoring {self.rows} responses",
                            lambda: timed_out(self.name, self.timeout_s, self.rows))
        if "error" in reply:
            raise RewardFunctionError(reply["error"])
        return checked_scores(reply.get("scores"), self.name, self.rows)

    def _reply(self, deadline: float, doing: str, late: Callable[[], RewardFunctionError]) -> dict:
        """The worker's next message, waiting until `deadline` at most (then the worker is killed
        and late() raised); `doing` says what it was doing, should it end."""
        while True:
            # In slices: a worker's end shows in its exit status (its pipe may live on in a child).
            if wait([self.conn], timeout=max(0.0, min(deadline - time.monotonic(), _POLL_S))):
                try:
                    reply = json.loads(self.conn.recv_bytes())
                    self.busy = False
                    return reply
                except (EOFError, OSError):  # it closed the pipe: ended, or about to
                    self._wait_exit()
                except ValueError as e:
                    self.abandon()
                    raise RewardFunctionError(f"the reward function {self.name}'s worker sent an "
                                              f"unreadable reply ({e})") from None
            if self.process.poll() is not None:
                raise self._ended(doing)
            if time.monotonic() >= deadline:
                self.abandon()
                raise late()

    def _wait_exit(self) -> None:
        """Give a worker that closed its pipe a moment to exit (its status then names how)."""
        try:
            self.process.wait(1.0)
        except subprocess.TimeoutExpired:
            pass

    def _ended(self, doing: str) -> RewardFunctionError:
        """The failure of a worker that ended by itself (it is cleaned up)."""
        code = self.process.returncode
        killed = code is not None and code < 0
        how = f"killed by {signal.Signals(-code).name}" if killed else f"exit code {code}"
        self.abandon()
        return RewardFunctionError(f"the reward function {self.name} ended its worker process "
                                   f"({how}) while {doing}")

    def abandon(self) -> None:
        """Kill the worker and its whole process group (a call may be running: what it forked
        dies too; its sandboxes die with their parent), remove the sandbox cgroups and temporary
        directories it made; the next call starts a fresh one."""
        if self.process is not None:
            try:  # the worker leads its own session: its group is its pid
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.process.kill()
            self.process.wait()
            _remove_sandbox_dirs(self.process.pid)
            self.conn.close()
            self.process = self.conn = None
        self.busy = False
        atexit.unregister(self.close)

    def close(self) -> None:
        self.abandon()


def _remove_sandbox_dirs(pid: int) -> None:
    """The run cgroups and the weak sandbox modes' work directories a killed worker left
    (bubblewrap's are tmpfs)."""
    RunCgroup.remove_left_by(pid)
    for path in glob.glob(os.path.join(tempfile.gettempdir(), glob.escape(work_dir_prefix(pid))
                                       + "*")):
        shutil.rmtree(path, ignore_errors=True)


def start_workers(runners: list[ProcessRunner]) -> None:
    """Start every runner's worker, loading side by side."""
    try:
        for runner in runners:
            runner.spawn()
        for runner in runners:
            runner.wait_loaded()
    except BaseException:
        for runner in runners:
            runner.close()
        raise


def serve(conn: Connection, parent_pid: int) -> None:
    """The worker: load the function of the FunctionSource the trainer sends first (with its
    sys.path), say it is ready (or why it is not), then score each batch received until the trainer
    closes the pipe. Everything it reads is the trainer's own message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C sent to it is the trainer's to handle
    die_with(parent_pid)
    name, sys.path[:], source = pickle.loads(conn.recv_bytes())
    try:
        caller = RewardCaller(load_function(pickle.loads(source)), name)
    except FusedRLError as e:
        return _send(conn, {"error": str(e), "exit_code": e.exit_code})
    except BaseException as e:  # a callable whose module is not importable here
        return _send(conn, {"error": f"the reward function {name} could not be loaded in its "
                                     f"worker process ({type(e).__name__}: {e}): define it in an "
                                     "importable module, or set reward.isolation=thread",
                            "exit_code": FusedRLError.exit_code})
    _send(conn, {"ready": caller.style})
    while True:
        try:
            inputs = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        try:
            reply = {"scores": caller(inputs)}
        except RewardFunctionError as e:
            reply = {"error": str(e)}
        _send(conn, reply)


def _send(conn, message: dict) -> None:
    conn.send_bytes(json.dumps(message).encode())


if __name__ == "__main__":  # python -m ...workers FD PARENT_PID: ProcessRunner.spawn
    serve(Connection(int(sys.argv[1])), int(sys.argv[2]))
