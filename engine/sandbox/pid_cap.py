"""A pid cgroup per sandbox run: caps how many processes the run may hold at once (a fork bomb
meets the cap, not the machine's pid table) and finds every one of them at the end, whatever
session or process group they moved to. Made only where the cgroup file system is writable
(cgroup v1's pids hierarchy or v2's unified one); elsewhere `PidCap.create` returns None.
"""
from __future__ import annotations

import os
import signal
import time
import uuid

_ROOTS = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")


class PidCap:
    """One run's cgroup: `join_fd` is written by the child before it executes the code."""

    def __init__(self, path: str, join_fd: int):
        self.path = path
        self.join_fd = join_fd

    @classmethod
    def create(cls, max_processes: int) -> "PidCap | None":
        """A new cgroup holding at most `max_processes`, or None where none can be made here."""
        for root in _ROOTS:
            if not os.path.exists(os.path.join(root, "pids.max")) and \
                    not os.path.exists(os.path.join(root, "cgroup.subtree_control")):
                continue
            path = os.path.join(root, f"fusedrl-sandbox-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                os.mkdir(path)
            except OSError:
                continue
            try:
                with open(os.path.join(path, "pids.max"), "w") as limit:
                    limit.write(str(max_processes))
                join_fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
            except OSError:
                _remove(path)
                continue
            return cls(path, join_fd)
        return None

    def join(self) -> None:
        """Move the calling process into the cgroup (called in the child, before exec)."""
        os.write(self.join_fd, str(os.getpid()).encode())

    def kill_all(self) -> None:
        """SIGKILL every process still in the cgroup, until none is left (or 2 s have passed)."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            pids = self._pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def close(self) -> None:
        """Kill what is left, then remove the cgroup."""
        self.kill_all()
        os.close(self.join_fd)
        _remove(self.path)

    def _pids(self) -> list[int]:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as procs:
                return [int(line) for line in procs.read().split()]
        except OSError:
            return []


def _remove(path: str) -> None:
    for _ in range(50):  # the kernel releases an emptied cgroup shortly after its last exit
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
