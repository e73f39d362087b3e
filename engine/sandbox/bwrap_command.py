"""The bubblewrap command of one sandbox run (isolation.py's strong mode).

bubblewrap runs unprivileged (a root caller's as a fresh uid: fresh_user.py). The code runs in
new user, pid, mount, network, ipc, uts and cgroup namespaces as uid/gid 65534, with every
capability dropped, no further user namespace (`--disable-userns`), the seccomp filter of
seccomp.py, a new session, and SIGKILL when bwrap or its parent dies. It sees: /usr and the
interpreter's prefix read-only, its own /proc (its own processes only), a minimal /dev, and two
tmpfs of TMPFS_MB each: /tmp and its work directory /sandbox, where its files are copied from
memory (nothing of a run is on the host's disk); the rest is read-only. No home, no run
directory, no /etc. A launcher sets RLIMIT_NPROC inside the new user namespace (counted per
namespace: a per-run process cap for a non-root trainer) before the interpreter starts.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Mapping

from . import fresh_user, seccomp

NOBODY = 65534
SANDBOX_DIR = "/sandbox"  # the run's work directory inside
TMPFS_MB = 64  # each of /tmp and /sandbox
_LAUNCH = ("import os,resource,sys;n=int(sys.argv[1]);"
           "resource.setrlimit(resource.RLIMIT_NPROC,(n,n));os.execv(sys.argv[2],sys.argv[2:])")


def python() -> str:
    """The real interpreter, not a venv's link to it: the sandbox shows only its prefix."""
    return os.path.realpath(sys.executable)


class BwrapCommand:
    """`argv` runs `python -I -B main.py` (or `args`) with `files` ({name: text}, main.py among
    them) in /sandbox; the memory files it reads stay open until close()."""

    def __init__(self, files: Mapping[str, str], max_processes: int,
                 args: tuple[str, ...] = ("-I", "-B", "main.py")):
        self.fds: list[int] = []
        # bwrap writes {"child-pid": N} here: the sandbox's first process, whose end is the end
        # of every process in the sandbox (the kernel reaps its pid namespace first).
        self._info, info = os.pipe()
        os.set_inheritable(info, True)
        self.fds.append(info)
        words = ["bwrap", "--info-fd", str(info), "--unshare-all", "--unshare-user",
                 "--uid", str(NOBODY), "--gid", str(NOBODY), "--disable-userns",
                 "--cap-drop", "ALL", "--die-with-parent", "--new-session",
                 "--seccomp", str(self._memory_file(seccomp.program())),
                 "--ro-bind", "/usr", "/usr", *_merged_usr_links()]
        base = os.path.realpath(sys.base_prefix)
        self.uid = fresh_user.new_uid() if fresh_user.needed() else None
        self.prefix = "" if base.startswith("/usr/") else base  # to show: /usr is bound whole
        if self.prefix:
            words += ["--ro-bind", fresh_user.VIEW if self.uid else base, base]
        words += ["--proc", "/proc", "--dev", "/dev"]
        for directory in ("/tmp", SANDBOX_DIR):
            words += ["--perms", "0700", "--size", str(TMPFS_MB << 20), "--tmpfs", directory]
        made = {SANDBOX_DIR}
        for name, text in files.items():
            path = os.path.join(SANDBOX_DIR, name)
            for parent in _parents(path):
                if parent not in made:
                    made.add(parent)
                    words += ["--perms", "0700", "--dir", parent]
            words += ["--perms", "0600", "--file",
                      str(self._memory_file(text.encode("utf-8"))), path]
        # The root (bubblewrap's own tmpfs, uncapped) read-only: the two capped tmpfs take writes.
        self.argv = [*words, "--remount-ro", "/", "--chdir", SANDBOX_DIR,
                     python(), "-I", "-S", "-c", _LAUNCH, str(max_processes), python(), *args]

    def enter(self) -> None:
        """In the child before exec (a root caller's): become the run's fresh uid."""
        if self.uid is not None:
            fresh_user.enter(self.uid, self.prefix)

    def _memory_file(self, data: bytes) -> int:
        fd = os.memfd_create("fusedrl-sandbox", 0)  # inheritable: no MFD_CLOEXEC
        self.fds.append(fd)
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def started(self) -> None:
        """After the process started: our copy of the info pipe's end closed (bwrap holds its)."""
        os.close(self.fds.pop(0))

    def wait_sandbox_gone(self, limit_s: float = 2.0) -> None:
        """After bwrap has ended: wait until the sandbox's first process (and so all of them) is
        gone, at most `limit_s`."""
        os.set_blocking(self._info, False)
        try:
            match = re.search(rb'"child-pid":\s*(\d+)', os.read(self._info, 4096))
        except (BlockingIOError, OSError):
            match = None
        deadline = time.monotonic() + limit_s
        while match and _running(int(match.group(1))) and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        for fd in [*self.fds, self._info]:
            os.close(fd)
        self.fds = []


def probe() -> str:
    """'' when a bubblewrap sandbox runs a statement here, else bwrap's reason (one line)."""
    command = BwrapCommand({"main.py": "pass\n"}, max_processes=8)
    try:
        done = subprocess.run(command.argv, pass_fds=command.fds, preexec_fn=command.enter,
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        command.close()
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    return "" if done.returncode == 0 else (lines[-1] if lines else f"exit {done.returncode}")


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _parents(path: str) -> list[str]:
    """The directories between /sandbox and `path`, outermost first."""
    parents = []
    while (path := os.path.dirname(path)) != SANDBOX_DIR:
        parents.append(path)
    return parents[::-1]


def _merged_usr_links() -> list[str]:
    """/bin, /lib, /lib64, /sbin as on the host: links into /usr (merged /usr) or read-only
    binds."""
    words: list[str] = []
    for top in ("bin", "lib", "lib64", "sbin"):
        path = f"/{top}"
        if os.path.islink(path):
            words += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            words += ["--ro-bind", path, path]
    return words
