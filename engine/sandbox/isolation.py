"""What the sandbox can isolate on this machine, found once per process and said in one line, and
the rule that the model's code runs only in a strong sandbox unless a weaker one is asked for.

- `bwrap` (strong; bubblewrap with user namespaces, and a seccomp table for this architecture):
  bwrap_command.py says what the code sees and may do.
- `unshare` (weak): new network and pid namespaces only; the host's files and unix socket files
  stay reachable with the caller's permissions (as root: all of them, the caller's memory through
  the host's /proc, and the caller's network through setns), and so do AF_VSOCK ports (a network
  namespace does not separate them) and the kernel's objects no cap counts (System V IPC, AIO
  contexts, ptys). Isolation.not_isolated lists it all.
- `none` (weak): a new process session and resource limits only.
The program of a mode is found once, on the caller's PATH (bwrap: the first there that runs a
strong sandbox), and run from that absolute path (a run's own PATH is a fixed one).
A weak mode runs the model's code only with `sandbox.allow_weak_isolation=true` (the environment
variable ALLOW_WEAK_ENV set to 1: the trainer sets it for itself and its workers) or when the
caller passes it to run_python explicitly; otherwise run_python refuses in one line.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator, Sequence

from ..errors import UsageError
from . import seccomp

ALLOW_WEAK_ENV = "FUSEDRL_SANDBOX_ALLOW_WEAK"
# reward.fn_timeout_s, for a reward built on the sandbox to end its batch before it (code_tests)
REWARD_TIMEOUT_ENV = "FUSEDRL_REWARD_FN_TIMEOUT_S"


class SandboxRefused(UsageError):
    """No strong sandbox here, and the weaker one was not asked for."""


@dataclass(frozen=True)
class Isolation:
    """How runs are isolated here: `kind` is 'bwrap', 'unshare' or 'none'; `why_not_strong` says
    why bubblewrap could not be used (empty when it is); `program` is the absolute path of bwrap
    or unshare that runs it ('' for none)."""
    kind: str
    network: bool  # its own network namespace: no interface but its own loopback
    filesystem: bool  # host files hidden: only the interpreter (read-only) and its own tmpfs
    pids: bool  # its own pid namespace: nothing it starts outlives it, signals reach no host one
    why_not_strong: str = ""
    program: str = ""
    uncapped: str = ""  # bwrap: why its tmpfs' inodes are not capped ('' when they are)

    def __post_init__(self):
        if self.kind in ("bwrap", "unshare") and not os.path.isabs(self.program):
            raise ValueError(f"Isolation({self.kind!r}): program={self.program!r}, expected the "
                             f"absolute path of {self.kind}")

    @property
    def strong(self) -> bool:
        return self.kind == "bwrap"

    def command(self, argv: list[str]) -> list[str]:
        """The command that runs `argv` (in the caller's work directory) under unshare or none;
        bubblewrap's is BwrapCommand.argv."""
        if self.kind == "unshare":
            root = [] if os.geteuid() == 0 else ["--map-root-user"]
            return [self.program, *root, "--net", "--pid", "--fork", "--kill-child", *argv]
        return list(argv)

    def not_isolated(self) -> list[str]:
        """What the model's code reaches from this mode (empty for bwrap)."""
        if self.strong:
            return []
        reached = [] if self.network else \
            ["the network (TCP, abstract unix sockets, setns into the trainer's namespaces)"]
        if not self.filesystem:
            reached += ["host files (the trainer's permissions; as root, all)",
                        "host unix socket files (daemons, the trainer's own)",
                        "the disk (each file size-capped, not their total)"]
        reached.append("host processes through /proc (the trainer's memory and environment)"
                       if self.pids else "host processes (signals, /proc, the trainer's memory)")
        return reached + ["the trainer's uid (as root: root, every capability)",
                          "AF_VSOCK sockets (a port space the host shares)",
                          "System V and POSIX IPC", "kernel objects no cap counts (AIO "
                          "contexts, inotify and fanotify groups, ptys: host-wide or the "
                          "trainer's uid's counts)", "the kernel's surface (no seccomp)"]

    def describe(self) -> str:
        """One line: the mode, whether it is strong, and what it does not isolate."""
        if self.strong:
            tmpfs = "tmpfs capped in size and inodes" if not self.uncapped else \
                f"tmpfs capped in size (inodes NOT capped: {self.uncapped})"
            return ("sandbox: bwrap (strong): own user, pid, mount, network, ipc and uts "
                    "namespaces, uid 65534, no capabilities, seccomp, read-only interpreter "
                    f"and /dev, no pty, {tmpfs} (docs/safety.md)")
        return (f"sandbox: {self.kind} (WEAK: NOT isolated: {'; '.join(self.not_isolated())}; "
                f"bubblewrap unusable: {self.why_not_strong}; docs/safety.md)")


def checked(isolation: "Isolation | None") -> Isolation:
    """The isolation a run uses: the one given (the caller's explicit choice), else detect()'s,
    refused in one line when it is weak and the weaker mode was not asked for."""
    if isolation is not None:
        return isolation
    found = detect()
    if not found.strong and os.environ.get(ALLOW_WEAK_ENV) != "1":
        raise SandboxRefused(
            f"refusing to run the model's code: no strong sandbox here (bubblewrap unusable: "
            f"{found.why_not_strong}); install bubblewrap (apt-get install bubblewrap) or set "
            f"sandbox.allow_weak_isolation=true to run it under {found.kind!r} (docs/safety.md)")
    return found


def allow_weak_isolation(allowed: bool) -> None:
    """Let run_python use a weak mode (or not) in this process and the workers it starts."""
    os.environ[ALLOW_WEAK_ENV] = "1" if allowed else "0"


@contextlib.contextmanager
def open_sandbox(allow_weak: bool, uses: Sequence = (), reward_timeout_s: float = 0.0,
                 multi_turn: bool = False) -> Iterator[str]:
    """For a run's length (a context manager): let the model's code run under a weak mode or not
    (the process and the workers it starts) and yield the mode's kind for the run's metrics.
    `uses`: the run's reward functions and tools ('module:function' specs or callables); one of
    fusedrl's sandbox under a weak mode not asked for is refused at once. The mode is said on
    stderr (the main rank) when the run may run the model's code: a reward or tool of the sandbox,
    or any `multi_turn` run (tools or an environment). `reward_timeout_s` (reward.fn_timeout_s; 0:
    none) is passed on to the reward workers. Both reach the workers through the environment, which
    is restored when the run ends: a later run in the process starts from the caller's own."""
    saved = {name: os.environ.get(name) for name in (ALLOW_WEAK_ENV, REWARD_TIMEOUT_ENV)}
    try:
        allow_weak_isolation(allow_weak)
        if reward_timeout_s:
            os.environ[REWARD_TIMEOUT_ENV] = str(reward_timeout_s)
        else:
            os.environ.pop(REWARD_TIMEOUT_ENV, None)
        found = detect()
        sandboxed = any(_in_sandbox_package(use) for use in uses)
        if sandboxed:
            checked(None)
        if (sandboxed or multi_turn) and int(os.environ.get("RANK", "0")) == 0:
            refused = "" if found.strong or allow_weak else \
                "; the model's code is refused (sandbox.allow_weak_isolation=true runs it)"
            print(f"fusedrl: {found.describe()}{refused}", file=sys.stderr)
        yield found.kind
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _in_sandbox_package(use) -> bool:
    module = use.partition(":")[0] if isinstance(use, str) else getattr(use, "__module__", "")
    return (module or "").startswith(__package__ or "fusedrl.engine.sandbox")


def _works(argv: list[str]) -> str:
    """'' when `argv` starts this interpreter and runs a statement, else why not (one line)."""
    scratch = tempfile.mkdtemp(prefix=f"fusedrl-sandbox-{os.getpid()}-probe-")
    try:
        done = subprocess.run(argv, cwd=scratch, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=20)
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        return "" if done.returncode == 0 else (lines[-1] if lines else f"exit {done.returncode}")
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _on_path(name: str) -> list[str]:
    """The absolute paths of the executable files `name` on this process's PATH, in its order,
    each file once (/bin and /usr/bin are one directory on a merged /usr)."""
    found: dict[str, str] = {}  # real path: the path on PATH
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.abspath(os.path.join(directory or ".", name))
        if os.path.isfile(path) and os.access(path, os.X_OK):
            found.setdefault(os.path.realpath(path), path)
    return list(found.values())


def _not_on_path(name: str) -> str:
    return f"{name} not found on PATH={os.environ.get('PATH', os.defpath)}"


def _bwrap_problem() -> tuple[str, str, str]:
    """(the absolute path of the first bwrap on PATH that runs a strong sandbox here, '', why its
    tmpfs' inodes are not capped or ''), else ('', why not: each one tried, or where it looked,
    '')."""
    from .bwrap_command import probe  # the probe runs a real sandbox
    if seccomp.program() is None:
        return "", "no seccomp table for this architecture", ""
    problems = []
    for bwrap in _on_path("bwrap"):
        problem = probe(bwrap)
        if not problem:
            return bwrap, "", ""
        # A plain user that may not mount in a user namespace of its own (Ubuntu's AppArmor
        # restriction) still gets bubblewrap's isolation, its tmpfs capped in size only.
        if "run_mounts.py" in problem and os.geteuid() != 0 and not probe(bwrap, capped=False):
            return bwrap, "", problem
        problems.append(problem if bwrap in problem else f"bwrap at {bwrap}: {problem}")
    return "", " | ".join(problems) or _not_on_path("bwrap"), ""


@functools.lru_cache(maxsize=None)
def detect(prefer: str = "auto") -> Isolation:
    """The strongest isolation that works here (`prefer` 'bwrap', 'unshare' or 'none' forces one
    and fails in one line when it does not work)."""
    if prefer not in ("auto", "bwrap", "unshare", "none"):
        raise ValueError(f"sandbox isolation {prefer!r}: expected auto, bwrap, unshare or none")
    bwrap, problem, uncapped = _bwrap_problem() if prefer in ("auto", "bwrap") else \
        ("", "not chosen", "")
    if not problem:
        return Isolation("bwrap", network=True, filesystem=True, pids=True, program=bwrap,
                         uncapped=uncapped)
    if prefer == "bwrap":
        raise RuntimeError(f"sandbox isolation 'bwrap' does not work on this machine: {problem}")
    if prefer in ("auto", "unshare"):
        programs = _on_path("unshare")
        failed = _not_on_path("unshare")
        if programs:
            # A root trainer's code is root: it can setns back into the trainer's network.
            unshare = Isolation("unshare", network=os.geteuid() != 0, filesystem=False, pids=True,
                                why_not_strong=problem, program=programs[0])
            failed = _works(unshare.command([os.path.realpath(sys.executable), "-I", "-c",
                                             "pass"]))
            if not failed:
                return unshare
        if prefer == "unshare":
            raise RuntimeError(f"sandbox isolation 'unshare' does not work on this machine: "
                               f"{failed}")
    return Isolation("none", network=False, filesystem=False, pids=False, why_not_strong=problem)
