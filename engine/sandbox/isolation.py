"""What the sandbox can isolate on this machine, found once per process and said in one line, and
the rule that the model's code runs only in a strong sandbox unless a weaker one is asked for.

- `bwrap` (strong; bubblewrap with user namespaces, and a seccomp table for this architecture):
  bwrap_command.py says what the code sees and may do.
- `unshare` (weak): new network and pid namespaces only; the host's files stay visible with the
  caller's permissions (as root: all of them, and the caller's memory through /proc).
- `none` (weak): a new process session and resource limits only.
A weak mode runs the model's code only with `sandbox.allow_weak_isolation=true` (the environment
variable ALLOW_WEAK_ENV set to 1: the trainer sets it for itself and its workers) or when the
caller passes it to run_python explicitly; otherwise run_python refuses in one line.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Sequence

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
    why bubblewrap could not be used (empty when it is)."""
    kind: str
    network: bool  # its own network namespace: no interface but its own loopback
    filesystem: bool  # host files hidden: only the interpreter (read-only) and its own tmpfs
    pids: bool  # its own pid namespace: nothing it starts outlives it, it sees no host process
    why_not_strong: str = ""

    @property
    def strong(self) -> bool:
        return self.kind == "bwrap"

    def command(self, argv: list[str]) -> list[str]:
        """The command that runs `argv` (in the caller's work directory) under unshare or none;
        bubblewrap's is bwrap_command.command."""
        if self.kind == "unshare":
            root = [] if os.geteuid() == 0 else ["--map-root-user"]
            return ["unshare", *root, "--net", "--pid", "--fork", "--kill-child", *argv]
        return list(argv)

    def describe(self) -> str:
        """One line: the mode, whether it is strong, and what it does not isolate."""
        if self.strong:
            return ("sandbox: bwrap (strong): own user, pid, mount, network, ipc and uts "
                    "namespaces, uid 65534, no capabilities, seccomp, read-only interpreter, "
                    "size-capped tmpfs (docs/safety.md)")
        open_ = [name for name, on in (("network", self.network), ("host files", self.filesystem),
                                       ("processes", self.pids)) if not on]
        return (f"sandbox: {self.kind} (WEAK: NOT isolated: {', '.join(open_)}; no seccomp; "
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


def open_sandbox(allow_weak: bool, uses: Sequence = (), reward_timeout_s: float = 0.0,
                 multi_turn: bool = False) -> str:
    """At a run's start: let the model's code run under a weak mode or not (the process and the
    workers it starts) and return the mode's kind for the run's metrics. `uses`: the run's reward
    functions and tools ('module:function' specs or callables); one of fusedrl's sandbox under a
    weak mode not asked for is refused at once. The mode is said on stderr (the main rank) when
    the run may run the model's code: a reward or tool of the sandbox, or any `multi_turn` run
    (tools or an environment). `reward_timeout_s` (reward.fn_timeout_s) is passed on to the
    reward workers."""
    allow_weak_isolation(allow_weak)
    if reward_timeout_s:
        os.environ[REWARD_TIMEOUT_ENV] = str(reward_timeout_s)
    found = detect()
    sandboxed = any(_in_sandbox_package(use) for use in uses)
    if sandboxed:
        checked(None)
    if (sandboxed or multi_turn) and int(os.environ.get("RANK", "0")) == 0:
        refused = "" if found.strong or allow_weak else \
            "; the model's code is refused (sandbox.allow_weak_isolation=true runs it)"
        print(f"fusedrl: {found.describe()}{refused}", file=sys.stderr)
    return found.kind


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


def _bwrap_problem() -> str:
    from .bwrap_command import probe  # the probe runs a real sandbox
    if not shutil.which("bwrap"):
        return "bwrap not found"
    if seccomp.program() is None:
        return "no seccomp table for this architecture"
    return probe()


@functools.lru_cache(maxsize=None)
def detect(prefer: str = "auto") -> Isolation:
    """The strongest isolation that works here (`prefer` 'bwrap', 'unshare' or 'none' forces one
    and fails in one line when it does not work)."""
    if prefer not in ("auto", "bwrap", "unshare", "none"):
        raise ValueError(f"sandbox isolation {prefer!r}: expected auto, bwrap, unshare or none")
    problem = _bwrap_problem() if prefer in ("auto", "bwrap") else "not chosen"
    if not problem:
        return Isolation("bwrap", network=True, filesystem=True, pids=True)
    if prefer == "bwrap":
        raise RuntimeError(f"sandbox isolation 'bwrap' does not work on this machine: {problem}")
    unshare = Isolation("unshare", network=True, filesystem=False, pids=True,
                        why_not_strong=problem)
    if prefer in ("auto", "unshare"):
        python = [os.path.realpath(sys.executable), "-I", "-c", "pass"]
        failed = _works(unshare.command(python)) if shutil.which("unshare") else "not found"
        if not failed:
            return unshare
        if prefer == "unshare":
            raise RuntimeError(f"sandbox isolation 'unshare' does not work on this machine: "
                               f"{failed}")
    return Isolation("none", network=False, filesystem=False, pids=False, why_not_strong=problem)
