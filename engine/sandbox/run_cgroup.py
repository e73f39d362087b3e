"""A sandbox run's own cgroups: the total of its processes (`pids`) and of its memory, page cache,
tmpfs pages and TCP's socket buffers included (`memory`), capped across everything it starts,
and every process of it found at the end, whatever session or process group it moved to.

The hierarchies are found where this process really is (/proc/self/cgroup read against
/proc/self/mountinfo: cgroup v1's per-controller mounts, or v2's unified one), and a child cgroup
is made beside this process's own. Where that directory is not writable (a non-root trainer, a
read-only cgroup mount) the controller is missing and `RunCgroup.pids` / `.memory` say so.
"""
from __future__ import annotations

import os
import signal
import time
import uuid

# controller: (v1 limit files, v2 limit files); the first is the cap, the rest (swap) follow it
_LIMITS = {"pids": (("pids.max",), ("pids.max",)),
           "memory": (("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"),
                      ("memory.max", "memory.swap.max"))}
# cgroup v1 counts TCP's socket buffers apart from memory.limit_in_bytes, uncapped unless this
# is set: a run's loopback connections held 343 MiB at a 256 MiB cap (v2's memory.max counts them)
_V1_TCP, TCP_MB = "memory.kmem.tcp.limit_in_bytes", 16


class RunCgroup:
    """One run's cgroups; `join()` is called in the child before it executes the sandbox."""

    def __init__(self, paths: dict[str, str], joinable: bool = True):
        self.paths = paths  # controller -> this run's cgroup directory
        self._procs = [os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
                       for path in dict.fromkeys(paths.values())] if joinable else []

    @property
    def pids(self) -> bool:
        return "pids" in self.paths

    @property
    def memory(self) -> bool:
        return "memory" in self.paths

    @classmethod
    def create(cls, max_processes: int, memory_bytes: int) -> "RunCgroup":
        """Cgroups holding at most `max_processes` and `memory_bytes`, each where it can be made."""
        caps = {"pids": max_processes, "memory": memory_bytes}
        paths: dict[str, str] = {}
        name = f"fusedrl-sandbox-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # remove_left_by's
        for controller, (directory, v2) in _hierarchies().items():
            path = os.path.join(directory, name)
            try:
                os.makedirs(path, exist_ok=True)
                files = _LIMITS[controller][1 if v2 else 0]
                for at, limit in enumerate(files):
                    value = str(caps[controller]) if at == 0 or not v2 else "0"  # no swap
                    if at == 0 or os.path.exists(os.path.join(path, limit)):
                        with open(os.path.join(path, limit), "w") as out:
                            out.write(value)
                if controller == "memory" and os.path.exists(os.path.join(path, _V1_TCP)):
                    with open(os.path.join(path, _V1_TCP), "w") as out:
                        out.write(str(min(TCP_MB << 20, memory_bytes)))
            except OSError:
                if path not in paths.values():
                    _remove(path)
                continue
            paths[controller] = path
        return cls(paths)

    @staticmethod
    def memory_capped() -> bool:
        """Whether a run's memory can be capped in total here (a memory cgroup can be made)."""
        probe = RunCgroup.create(8, 64 << 20)
        probe.close()
        return probe.memory

    @staticmethod
    def remove_left_by(pid: int) -> None:
        """Kill the processes of, and remove, the run cgroups a killed process `pid` made."""
        prefix = f"fusedrl-sandbox-{pid}-"
        for directory, _v2 in _hierarchies().values():
            try:
                names = [name for name in os.listdir(directory) if name.startswith(prefix)]
            except OSError:
                continue
            for name in names:
                RunCgroup({"left": os.path.join(directory, name)}, joinable=False).close()

    def join(self) -> None:
        """Move the calling process into the run's cgroups (in the child, before exec)."""
        for fd in self._procs:
            os.write(fd, str(os.getpid()).encode())

    def kill_all(self) -> None:
        """SIGKILL every process still in the cgroups, until none is left (or 2 s have passed)."""
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
        """Kill what is left, then remove the cgroups."""
        self.kill_all()
        for fd in self._procs:
            os.close(fd)
        for path in dict.fromkeys(self.paths.values()):
            _remove(path)

    def _pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.paths.values():
            try:
                with open(os.path.join(path, "cgroup.procs")) as procs:
                    found.update(int(line) for line in procs.read().split())
            except OSError:
                pass
        return found


def _hierarchies() -> dict[str, tuple[str, bool]]:
    """controller -> (the directory of this process's cgroup in it, whether it is cgroup v2)."""
    mounts: dict[str, tuple[str, str]] = {}  # controller ('' for v2) -> (mount root, mount point)
    try:
        with open("/proc/self/mountinfo") as info:
            for line in info:
                fields, _, tail = line.partition(" - ")
                fstype, _source, options = (tail.split() + ["", ""])[:3]
                root, point = fields.split()[3:5]
                if fstype == "cgroup2":
                    mounts.setdefault("", (root, point))
                elif fstype == "cgroup":
                    for controller in options.split(","):
                        mounts.setdefault(controller, (root, point))
        with open("/proc/self/cgroup") as own:
            lines = [line.rstrip("\n").split(":", 2) for line in own]
    except OSError:
        return {}
    found: dict[str, tuple[str, bool]] = {}
    for _id, controllers, path in lines:
        for controller in controllers.split(",") if controllers else [""]:
            if controller not in mounts:
                continue
            root, point = mounts[controller]
            relative = os.path.relpath(path, root) if path.startswith(root) else None
            if relative is None:
                continue
            directory = os.path.normpath(os.path.join(point, relative))
            if controller == "":  # v2: the controllers enabled for children of this cgroup
                for name in _v2_controllers(directory):
                    found.setdefault(name, (directory, True))
            elif controller in _LIMITS:
                found[controller] = (directory, False)
    return found


def _v2_controllers(directory: str) -> list[str]:
    try:
        with open(os.path.join(directory, "cgroup.subtree_control")) as control:
            return [name for name in control.read().split() if name in _LIMITS]
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
