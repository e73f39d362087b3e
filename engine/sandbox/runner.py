"""Run untrusted Python (the model's code) in a fresh interpreter, bounded and isolated.

`run_python(code, timeout_s=..., memory_mb=...)` runs `code` as main.py (beside any `files`) with
`python -I -B main.py` in its own process session under resource limits (CPU time, address space,
file size, open files), in the isolation of isolation.py (a strong one, or a weak one asked for),
with the run's total processes and memory capped by its own cgroups where they can be made
(run_cgroup.py); it kills the whole run at the timeout or when its caller dies, keeps at most
`output_limit` bytes of each stream, and leaves nothing behind: under bubblewrap the work
directory is a tmpfs; a weak mode's temporary directory is removed. The environment is scrubbed
to PATH, HOME (the work directory) and a UTF-8 locale.
"""
from __future__ import annotations

import ctypes
import math
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Optional

from .bwrap_command import SANDBOX_DIR, BwrapCommand, python
from .isolation import Isolation, checked
from .run_cgroup import RunCgroup

MAX_PROCESSES = 32  # per run: enough for a program that uses a few workers, not for a fork bomb
OPEN_FILES = 64
FILE_MB = 16  # largest file a run may write (RLIMIT_FSIZE)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def work_dir_prefix(pid: int) -> str:
    """The name start of a weak mode's temporary work directories made by process `pid` (a
    killed worker's are removed by whoever killed it)."""
    return f"fusedrl-sandbox-{pid}-"


@dataclass(frozen=True)
class SandboxResult:
    """What one run did. `returncode` is negative when a signal ended it (subprocess's rule);
    `killed` is True when a signal ended it (our timeout kill, or a limit: CPU, file size);
    `truncated` when a stream passed `output_limit` bytes (the rest was read and dropped)."""
    stdout: str
    stderr: str
    returncode: int
    timed_out: bool
    killed: bool
    truncated: bool
    seconds: float

    @property
    def ok(self) -> bool:
        """The program ran to its end and exited 0."""
        return self.returncode == 0 and not self.timed_out


def run_python(code: str, *, stdin: Optional[str] = None, timeout_s: float = 10.0,
               memory_mb: int = 512, files: Optional[Mapping[str, str]] = None,
               output_limit: int = 1 << 20, isolation: Optional[Isolation] = None) -> SandboxResult:
    """Run `code` as a Python program; `stdin` is its standard input, `files` ({relative name:
    text}) are written beside it; `memory_mb` caps each process and (where a memory cgroup can be
    made) the whole run. Returns within about timeout_s + 1 s whatever the code does. Refuses
    (isolation.SandboxRefused) when only a weak mode works here and none was asked for;
    `isolation` given is the caller's explicit choice."""
    _check_arguments(code, timeout_s, memory_mb, files, output_limit)
    isolation = checked(isolation)
    cgroup = RunCgroup.create(MAX_PROCESSES, memory_mb << 20)
    every_file = {"main.py": code, **(files or {})}
    bwrap = work_dir = None
    try:
        if isolation.strong:
            bwrap = BwrapCommand(isolation.program, every_file, MAX_PROCESSES,
                                 capped=not isolation.uncapped)
            argv, cwd, home, fds = bwrap.argv, "/", SANDBOX_DIR, bwrap.fds
        else:
            work_dir = tempfile.mkdtemp(prefix=work_dir_prefix(os.getpid()))
            _write_files(work_dir, every_file)
            argv = isolation.command([python(), "-I", "-B", "main.py"])
            cwd, home, fds = work_dir, work_dir, ()
        return _run(argv, cwd, home, fds, bwrap, stdin, timeout_s, memory_mb, output_limit,
                    cgroup)
    finally:
        cgroup.close()
        if bwrap is not None:
            bwrap.close()
        if work_dir is not None:
            shutil.rmtree(work_dir, onerror=_force_remove)


def _check_arguments(code, timeout_s, memory_mb, files, output_limit) -> None:
    if not isinstance(code, str):
        raise TypeError(f"run_python: code is {type(code).__name__}, expected str")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s)
            and 0 < timeout_s <= 3600):
        raise ValueError(f"run_python: timeout_s={timeout_s!r}, expected seconds in (0, 3600]")
    if not (isinstance(memory_mb, int) and 64 <= memory_mb <= 1 << 20):
        raise ValueError(f"run_python: memory_mb={memory_mb!r}, expected an int >= 64")
    if not (isinstance(output_limit, int) and output_limit > 0):
        raise ValueError(f"run_python: output_limit={output_limit!r}, expected a positive int")
    for name in files or {}:
        parts = name.replace("\\", "/").split("/")
        if os.path.isabs(name) or ".." in parts or name in ("", "main.py"):
            raise ValueError(
                f"run_python: files name {name!r}: expected a relative path inside the "
                "work directory (no '..', not main.py)")


def _write_files(work_dir: str, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = os.path.join(work_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as out:
            out.write(text)


def _run(argv, cwd, home, fds, bwrap: Optional[BwrapCommand], stdin, timeout_s, memory_mb,
         output_limit, cgroup: RunCgroup) -> SandboxResult:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8",
           "PYTHONIOENCODING": "utf-8"}
    limits = _limits(timeout_s, memory_mb)
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def in_child():  # after fork, before exec: only async-signal-safe work
        # Killed when the thread that started it ends (its caller's process killed included).
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        for which, value in limits:
            resource.setrlimit(which, value)
        cgroup.join()  # while still allowed to: before giving up root
        if bwrap is not None:
            bwrap.enter()

    start = time.monotonic()
    process = subprocess.Popen(argv, cwd=cwd, env=env, start_new_session=True, preexec_fn=in_child,
                               pass_fds=fds,
                               stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if bwrap is not None:
        bwrap.started()
    streams = [_CappedReader(process.stdout, output_limit),
               _CappedReader(process.stderr, output_limit)]
    if stdin is not None:
        threading.Thread(target=_feed, args=(process.stdin, stdin), daemon=True).start()
    timed_out = False
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_everything(process, cgroup)
    process.wait()
    if bwrap is not None:
        bwrap.wait_sandbox_gone()
    seconds = time.monotonic() - start
    out, err = (reader.finish() for reader in streams)
    return SandboxResult(stdout=out[0], stderr=err[0], returncode=process.returncode,
                         timed_out=timed_out, killed=timed_out or process.returncode < 0,
                         truncated=out[1] or err[1], seconds=seconds)


def _limits(timeout_s: float, memory_mb: int) -> list[tuple[int, tuple[int, int]]]:
    cpu = math.ceil(timeout_s) + 1  # CPU seconds: a busy loop dies even if the wall clock lags
    limits = [(resource.RLIMIT_CPU, (cpu, cpu)),
              (resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20)),
              (resource.RLIMIT_FSIZE, (FILE_MB << 20, FILE_MB << 20)),
              (resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES)),
              (resource.RLIMIT_CORE, (0, 0))]
    return limits


def _kill_everything(process: subprocess.Popen, cgroup: RunCgroup) -> None:
    """The run's session (its process group; bubblewrap's sandbox dies with it), then whatever
    its cgroups still hold."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    cgroup.kill_all()


def _feed(pipe, text: str) -> None:
    try:
        pipe.write(text.encode("utf-8"))
        pipe.close()
    except (BrokenPipeError, OSError):  # the program exited without reading it all
        pass


class _CappedReader:
    """Reads a stream to its end in a thread, keeping the first `limit` bytes."""

    def __init__(self, pipe, limit: int):
        self.pipe, self.limit = pipe, limit
        self.kept = bytearray()
        self.truncated = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while chunk := self.pipe.read1(1 << 16):
            room = self.limit - len(self.kept)
            if len(chunk) > room:
                self.truncated = True
            self.kept += chunk[:max(room, 0)]

    def finish(self) -> tuple[str, bool]:
        """(the text kept, whether some was dropped); waits up to 2 s for the stream's end."""
        self.thread.join(2.0)
        self.pipe.close()
        return self.kept.decode("utf-8", errors="replace"), self.truncated


def _force_remove(function, path, _error) -> None:
    """rmtree's retry for entries the code made unreadable (chmod 000) inside its own directory."""
    parent = os.path.dirname(path)
    try:
        os.chmod(parent, 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
        function(path)
    except OSError:
        pass
