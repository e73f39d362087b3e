"""rollout.env_isolation=process (the default): each trajectory's environment in a worker process of
its own, as reward functions are (engine/stages/rewards/workers.py).

The trainer spawns a fresh interpreter (`python -m` this module: no torch, nothing of the
trainer's memory) per trajectory and talks to it in JSON, one message each way per call (the
trainer unpickles nothing a user's code wrote). What the process boundary buys: a call past
rollout.env_timeout_s is ended by SIGKILL of the worker's whole process group, whatever it holds
(the GIL in a C loop, a tool that never returns: no thread is left behind); memory an environment
leaks goes with its worker when the trajectory ends; an `os._exit` or a crash ends that trajectory
alone. The worker dies with the trainer (PR_SET_PDEATHSIG) and ignores the terminal's Ctrl-C.
"""
from __future__ import annotations

import json
import signal
import sys
from multiprocessing.connection import Connection

from ..sandbox.parent_death import die_with
from .environment import EnvironmentFailure, checked_messages, checked_step
from .sources import EnvSource


def serve(conn: Connection, parent_pid: int) -> None:
    """Load the environment the trainer names first ({"source", "row", "sys_path", "max_chars"}),
    say it is ready (or why not), then answer {"call": "reset"} and {"call": "step", "message"}
    until the trainer closes the pipe or kills the worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C sent to it is the trainer's to handle
    die_with(parent_pid)
    first = json.loads(conn.recv_bytes())
    sys.path[:] = first["sys_path"]
    source = first["source"]
    source = EnvSource(source["environment"], tuple(source["tools"]), source["schemas"])
    max_chars, env, loaded = first["max_chars"], None, {}

    def load():
        loaded["make"] = source.loader()
        return {"ready": True}
    reply = _answer(load, f"loading {source.name}")
    _send(conn, reply)
    if "error" in reply:
        return
    make = loaded["make"]
    while True:
        try:
            request = json.loads(conn.recv_bytes())
        except EOFError:
            return
        if request["call"] == "reset":
            def reset():
                nonlocal env
                env = make(first["row"])
                return {"messages": checked_messages(env.reset(), "reset()", max_chars)}
            _send(conn, _answer(reset, "reset()"))
        else:
            def step():
                messages, reward, done = checked_step(env.step(request["message"]), "step()",
                                                      max_chars)
                return {"messages": messages, "reward": reward, "done": done}
            _send(conn, _answer(step, "step()"))


def _answer(call, what: str) -> dict:
    """call()'s reply, or {"error": one line} when it raised (SystemExit too)."""
    try:
        return call()
    except EnvironmentFailure as e:
        return {"error": str(e)}
    except BaseException as e:  # the user's code: its failure ends its trajectory, no more
        return {"error": f"{what} raised {type(e).__name__}: {str(e)[:500]}"}


def _send(conn: Connection, message: dict) -> None:
    conn.send_bytes(json.dumps(message, default=str).encode())


if __name__ == "__main__":  # python -m ...env_worker FD PARENT_PID: isolation.ProcessEnvironment
    serve(Connection(int(sys.argv[1])), int(sys.argv[2]))
