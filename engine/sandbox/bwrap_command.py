"""The bubblewrap command of one sandbox run (isolation.py's strong mode).

bubblewrap (the absolute path detect() found) runs unprivileged (a root caller's as a fresh uid:
fresh_user.py). The code runs in new user, pid, mount, network, ipc, uts and cgroup namespaces as
uid/gid 65534, with every capability dropped, no further user namespace (`--disable-userns`), the
seccomp filter of seccomp.py, a new session, and SIGKILL when bwrap or its parent dies. It sees:
/usr and the interpreter's prefix read-only, its own /proc (its own processes only), a read-only
/dev of DEVICES alone (no devpts: no pty, whose count is the host's), and three tmpfs capped in
size and inodes (run_mounts.py): /tmp and its work directory /sandbox of TMPFS_MB each, where its
files are copied from memory (nothing of a run is on the host's disk), and /dev/shm of SHM_MB;
the rest is read-only. No home, no run directory, no /etc.

Its pid 1 is INIT, not bubblewrap's (`--as-pid-1`): bubblewrap's init runs as the code's uid and
holds the trainer's pipes, which the code could reopen through /proc/1/fd. INIT sets RLIMIT_NPROC
inside the new user namespace (counted per namespace: a per-run process cap for a non-root
trainer), makes itself non-dumpable (so /proc/1 is closed to the code), starts the interpreter,
closes every descriptor it holds, reaps orphans and ends with the interpreter's status (128 + the
signal when one ended it, as bubblewrap's init).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Mapping

from . import fresh_user, run_mounts, seccomp

NOBODY = 65534
SANDBOX_DIR = run_mounts.MOUNTS["sandbox"][0]  # the run's work directory inside
TMPFS_MB, TMPFS_INODES = run_mounts.MOUNTS["tmp"][1:]  # each of /tmp and /sandbox
SHM_MB, SHM_INODES = run_mounts.MOUNTS["shm"][1:]  # /dev/shm
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")  # bubblewrap's --dev set, no pts
INIT = """\
import ctypes, os, resource, signal, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0 (the child's exec makes it dumpable)
child = os.fork()
if child == 0:
    os.execv(sys.argv[2], sys.argv[2:])
signal.signal(signal.SIGINT, signal.SIG_IGN)
os.closerange(0, 1 << 16)
while True:
    pid, status = os.wait()
    if pid == child:
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
"""


def python() -> str:
    """The real interpreter, not a venv's link to it: the sandbox shows only its prefix."""
    return os.path.realpath(sys.executable)


class BwrapCommand:
    """`argv` runs `python -I -B main.py` (or `args`) with `files` ({name: text}, main.py among
    them) in /sandbox, through the bubblewrap at the absolute path `bwrap`; the memory files it
    reads stay open until close(). `capped=False` (a plain user only, where no user namespace of
    its own may mount: Ubuntu's AppArmor restriction) lets bubblewrap mount the tmpfs, capped in
    size only."""

    def __init__(self, bwrap: str, files: Mapping[str, str], max_processes: int,
                 args: tuple[str, ...] = ("-I", "-B", "main.py"), capped: bool = True):
        if not os.path.isabs(bwrap):
            raise ValueError(f"BwrapCommand: bwrap={bwrap!r}, expected an absolute path")
        self.fds: list[int] = []
        # bwrap writes {"child-pid": N} here: the sandbox's first process, whose end is the end
        # of every process in the sandbox (the kernel reaps its pid namespace first).
        self._info, info = os.pipe()
        os.set_inheritable(info, True)
        self.fds.append(info)
        words = [bwrap, "--info-fd", str(info), "--unshare-all", "--unshare-user", "--as-pid-1",
                 "--uid", str(NOBODY), "--gid", str(NOBODY), "--disable-userns",
                 "--cap-drop", "ALL", "--die-with-parent", "--new-session",
                 "--seccomp", str(self._memory_file(seccomp.program())),
                 "--ro-bind", "/usr", "/usr", *_merged_usr_links()]
        base = os.path.realpath(sys.base_prefix)
        self.uid = fresh_user.new_uid() if fresh_user.needed() else None
        self.prefix = "" if base.startswith("/usr/") else base  # to show: /usr is bound whole
        self.capped = capped or self.uid is not None  # root can always mount
        self.holder = run_mounts.holder()
        if self.prefix:
            words += ["--ro-bind", run_mounts.view(self.holder) if self.uid else base, base]
        # /dev read-only (a remount is not recursive: the device nodes and /dev/shm stay usable).
        words += ["--proc", "/proc", "--tmpfs", "/dev"]
        for device in DEVICES:
            words += ["--dev-bind", f"/dev/{device}", f"/dev/{device}"]
        for at, name in enumerate(("stdin", "stdout", "stderr")):
            words += ["--symlink", f"/proc/self/fd/{at}", f"/dev/{name}"]
        words += ["--symlink", "/proc/self/fd", "/dev/fd", *self._mount_words(), "--remount-ro",
                  "/dev"]
        made = {SANDBOX_DIR}
        for name, text in files.items():
            path = os.path.join(SANDBOX_DIR, name)
            for parent in _parents(path):
                if parent not in made:
                    made.add(parent)
                    words += ["--perms", "0700", "--dir", parent]
            words += ["--perms", "0600", "--file",
                      str(self._memory_file(text.encode("utf-8"))), path]
        # The root (bubblewrap's own tmpfs, uncapped) read-only: the capped tmpfs take writes.
        self.argv = [*words, "--remount-ro", "/", "--chdir", SANDBOX_DIR,
                     python(), "-I", "-S", "-c", INIT, str(max_processes), python(), *args]

    def enter(self) -> None:
        """In the child before exec: the run's capped mounts, then (a root caller) its fresh
        uid."""
        if self.capped:
            run_mounts.enter(self.holder, self.uid, self.prefix if self.uid is not None else "")
        if self.uid is not None:
            fresh_user.become(self.uid)

    def _mount_words(self) -> list[str]:
        if self.capped:
            return run_mounts.bind_words(self.holder)
        words: list[str] = []
        for inside, size_mb, _inodes in run_mounts.MOUNTS.values():
            words += ["--perms", "0700", "--size", str(size_mb << 20), "--tmpfs", inside]
        return words

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


def probe(bwrap: str, capped: bool = True) -> str:
    """'' when a bubblewrap sandbox started from the absolute path `bwrap` (its tmpfs `capped` in
    inodes or not) runs a statement here, else why not (one line)."""
    try:
        command = BwrapCommand(bwrap, {"main.py": "pass\n"}, max_processes=8, capped=capped)
    except RuntimeError as e:  # no directory for the run's mounts
        return str(e)
    try:
        done = subprocess.run(command.argv, pass_fds=command.fds, preexec_fn=command.enter,
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=20)
    except OSError as e:  # exec failed: the sandbox's user cannot reach that file
        who = f"uid {os.geteuid()}" if command.uid is None else "a fresh uid"
        return (f"bwrap at {bwrap} cannot be started by the sandbox's user ({who}): "
                f"{e.strerror}; install bubblewrap where every user can run it (/usr/bin)")
    except subprocess.TimeoutExpired as e:
        return f"{type(e).__name__}: {e}"
    except subprocess.SubprocessError as e:  # what preexec_fn raised is not passed on
        return (f"the run's mounts before bwrap at {bwrap} (run_mounts.py: a private mount "
                f"namespace{'' if command.uid else ' in a user namespace'} with capped tmpfs "
                f"under {command.holder}) could not be made: {e}")
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
