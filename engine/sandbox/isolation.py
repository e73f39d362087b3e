"""What the sandbox can isolate on this machine, found once per process and said in one line.

Three layers, the strongest available:
- bubblewrap (`bwrap`): new user, network, pid, ipc and uts namespaces; the code sees only the
  system's /usr, the interpreter's own prefix (read-only), a private /tmp and its work directory,
  as uid 65534 (nobody) inside. Every process it starts dies with the namespace's first process.
- `unshare` (root, or unprivileged user namespaces): new network and pid namespaces only; the
  host's files stay visible with the caller's permissions.
- nothing: a new process session and resource limits only.
A pid cgroup caps the processes of each run where the cgroup file system is writable (a fork bomb
is then refused at the cap); without one the per-user process limit applies to a non-root caller,
and a root caller's runs are bounded by the timeout alone. `describe()` says which holds.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

NOBODY = 65534
# Where the run's work directory appears inside bubblewrap.
SANDBOX_DIR = "/sandbox"


@dataclass(frozen=True)
class Isolation:
    """How runs are isolated here: `kind` is 'bwrap', 'unshare' or 'none'."""
    kind: str
    network: bool  # no network: its own namespace, no interface but its own loopback
    filesystem: bool  # host files hidden, only the work directory (and a private /tmp) writable
    pids: bool  # its own pid namespace: nothing it starts outlives it, it cannot signal the host

    def command(self, argv: list[str], work_dir: str) -> tuple[list[str], str]:
        """(the command to run `argv` isolated, the working directory it runs in)."""
        if self.kind == "bwrap":
            base = os.path.realpath(sys.base_prefix)
            return ["bwrap", "--unshare-all", "--die-with-parent", "--new-session",
                    "--uid", str(NOBODY), "--gid", str(NOBODY),
                    "--ro-bind", "/usr", "/usr", *_merged_usr_links(), "--ro-bind", base, base,
                    "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                    "--bind", work_dir, SANDBOX_DIR, "--chdir", SANDBOX_DIR, *argv], work_dir
        if self.kind == "unshare":
            root = [] if os.geteuid() == 0 else ["--map-root-user"]
            return ["unshare", *root, "--net", "--pid", "--fork", "--kill-child", *argv], work_dir
        return list(argv), work_dir

    def describe(self) -> str:
        """One line: what is isolated and what is not."""
        held = [name for name, on in (("network", self.network), ("host files", self.filesystem),
                                      ("processes", self.pids)) if on]
        open_ = [name for name, on in (("network", self.network), ("host files", self.filesystem),
                                       ("processes", self.pids)) if not on]
        line = (f"sandbox: {self.kind}; isolated: "
                f"{', '.join(held) or 'nothing beyond resource limits'}")
        if open_:
            line += f"; NOT isolated: {', '.join(open_)} (install bubblewrap for all three)"
        return line


def _merged_usr_links() -> list[str]:
    """/bin, /lib, /lib64 as on the host: links into /usr (merged /usr) or read-only binds."""
    words: list[str] = []
    for top in ("bin", "lib", "lib64", "sbin"):
        path = f"/{top}"
        if os.path.islink(path):
            words += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            words += ["--ro-bind", path, path]
    return words


def _works(isolation: Isolation) -> bool:
    """True when `isolation` can start this interpreter and run a statement."""
    scratch = tempfile.mkdtemp(prefix="fusedrl-sandbox-probe-")
    try:
        argv, cwd = isolation.command([os.path.realpath(sys.executable), "-I", "-c", "pass"],
                                      scratch)
        done = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=20)
        return done.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def detect(prefer: str = "auto") -> Isolation:
    """The strongest isolation that works here (`prefer` 'bwrap', 'unshare' or 'none' forces one
    and fails in one line when it does not work)."""
    candidates = {
        "bwrap": Isolation("bwrap", network=True, filesystem=True, pids=True),
        "unshare": Isolation("unshare", network=True, filesystem=False, pids=True),
        "none": Isolation("none", network=False, filesystem=False, pids=False),
    }
    if prefer != "auto":
        if prefer not in candidates:
            raise ValueError(f"sandbox isolation {prefer!r}: expected auto, bwrap, unshare or none")
        chosen = candidates[prefer]
        if chosen.kind != "none" and not (shutil.which(chosen.kind) and _works(chosen)):
            raise RuntimeError(f"sandbox isolation {prefer!r} does not work on this machine")
        return chosen
    for kind in ("bwrap", "unshare"):
        if shutil.which(kind) and _works(candidates[kind]):
            return candidates[kind]
    return candidates["none"]
