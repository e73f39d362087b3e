"""The directories fusedrl writes (a training run's output_dir, the demo's, a benchmark's, an
export's --out): one run per directory, and nothing replaced that fusedrl did not make.

    DIR/.fusedrl-run         {"kind": "sft", "created": "2026-01-01T00:00:00Z"}: written when
    fusedrl
                             creates the directory's contents, so a later command knows it made them
    DIR/.fusedrl-run.lock    the lock a run holds (fcntl.flock, which the OS releases when the
    process
                             dies, even by SIGKILL) and the holder's pid, for the message of a
                             second run

A command's target may be missing, empty, or an earlier output of the same command (marked). A
non-empty directory without the marker is refused whatever the options: fusedrl never deletes what
it did not make. An earlier output of the same command is continued (a training run with
train.resume=true), replaced (overwrite), or refused; another command's output is refused whatever
the options (an export's --overwrite never deletes a training run, nor an rm run an sft run).
Replacing never touches the current directory, the home directory, `/`, any of their parents, a
command's inputs or a directory holding one; a symbolic link inside the directory that leads out of
it is refused (writes never go through it).

Torch-free: the command line runs `check_target` before importing torch; `claim` takes the lock and
repeats the check under it.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable

from .durable import write_text_atomic
from ..errors import UsageError
from .run_paths import pinned

MARKER = ".fusedrl-run"
LOCK = ".fusedrl-run.lock"
_OURS = (MARKER, LOCK)  # present in a directory that holds no output yet


def read_marker(directory) -> dict | None:
    """The marker of a directory fusedrl made ({"kind", "created"}), None when it has none."""
    try:
        marker = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def write_marker(directory, kind: str) -> None:
    """Mark `directory` as made by the fusedrl command `kind` (sft, rm, ppo, grpo, demo, export)."""
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_text_atomic(Path(directory) / MARKER,
                      json.dumps({"kind": kind, "created": created}) + "\n")


def check_replaceable(path, inputs: Iterable = (), option: str = "output_dir") -> None:
    """UsageError unless the directory `path` may be deleted and written anew: never the current
    directory, the home directory, `/` or a parent of one of them, an input or a parent of one."""
    real = Path(path).resolve()
    for name, protected in (("the current directory", Path.cwd()),
                            ("the home directory", Path.home())):
        if real == protected.resolve() or real in protected.resolve().parents:
            raise UsageError(f"{option}={path} is {name} or holds it: fusedrl never replaces it; "
                             f"choose another {option}")
    if real == Path(real.anchor):
        raise UsageError(f"{option}={path} is the root directory: fusedrl never replaces it")
    check_holds_no_input(path, inputs, option)


def check_holds_no_input(path, inputs: Iterable, option: str) -> None:
    """UsageError when `path` is one of the command's inputs or a directory holding one: an output
    written there would replace what the command reads."""
    real = Path(path).resolve()
    for given in inputs:
        if given and (real == Path(given).resolve() or real in Path(given).resolve().parents):
            raise UsageError(
                f"{option}={path} is or holds the input {given}: choose another {option}")


def check_no_link_out(directory, option: str = "output_dir") -> None:
    """UsageError naming the first symbolic link inside `directory` that leads out of it."""
    root = Path(directory).resolve()
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            entry = Path(parent) / name
            if entry.is_symlink():
                target = Path(os.path.realpath(entry))  # a loop of links resolves as far as it goes
                if target != root and root not in target.parents:
                    raise UsageError(
                        f"{option}={directory}: {entry.relative_to(root)} is a symbolic link to "
                        f"{target}, outside {option}; fusedrl never writes through it: remove it")


def output_name(kind: str) -> str:
    """What the fusedrl command `kind` leaves in its directory, for a message ("sft run")."""
    return kind if kind == "export" else f"{kind} run"


def check_target(path, kind: str, *, overwrite: bool, resume: bool = False, inputs: Iterable = (),
                 option: str = "output_dir", overwrite_option: str = "overwrite=true",
                 resume_option: str | None = None, probe_lock: bool = True) -> bool:
    """Whether the command `kind` may write into the directory `path`; writes nothing. Returns True
    when it holds an earlier output of `kind` to be replaced first (overwrite), False when it is
    new, empty or continued (resume); a UsageError naming `option` and the way out
    (`overwrite_option`, and `resume_option` for a command that can continue) otherwise, whatever
    `overwrite` says for a directory fusedrl did not make or another command's output, and when
    another run holds its lock (probe_lock; off for the holder itself)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{option}={path}: exists and is not a directory")
    check_holds_no_input(p, inputs, option)
    if not p.is_dir():
        return False
    if probe_lock and (p / LOCK).is_file():
        # a run holding it: refused now, not after the imports
        DirLock(p, option, create=False).release()
    if not [e for e in p.iterdir() if e.name not in _OURS]:
        return False
    marker = read_marker(p)
    # Refused before its links are looked at: nothing in it is fusedrl's to advise on.
    if marker is None:
        raise UsageError(
            f"{option}={path} exists, is not empty and was not made by fusedrl (no {MARKER}): "
            f"fusedrl never deletes what it did not make; choose another {option}")
    check_no_link_out(p, option)
    # Before `overwrite`: it replaces an earlier output of this command, never another command's
    # (an export's --overwrite over a training run would delete its checkpoints).
    if marker["kind"] != kind:
        raise UsageError(
            f"{option}={path} holds a fusedrl {output_name(marker['kind'])}; {overwrite_option} "
            f"replaces only an earlier fusedrl {output_name(kind)}: choose another {option}")
    if overwrite:
        check_replaceable(p, inputs, option)
        return True
    if resume:
        return False
    if resume_option is None:
        raise UsageError(
            f"{option}={path} exists and is not empty; pass {overwrite_option} or another {option}")
    raise UsageError(
        f"{option}={path} holds an earlier {kind} run; pass {resume_option} to continue it, "
        f"{overwrite_option} to replace it, or another {option}")


class DirLock:
    """An exclusive flock on DIR/.fusedrl-run.lock, held until `release` or the process's end; a
    UsageError naming the holder's pid when another process holds it. create=False: only probe
    an existing lock file (nothing is written)."""

    def __init__(self, directory, option: str = "output_dir", create: bool = True):
        self.path = Path(directory) / LOCK
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            self._fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise UsageError(
                f"{option}={directory}: cannot open its lock file {LOCK} ({e.strerror})") from None
        if not _try_flock(self._fd):
            holder = os.pread(self._fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self._fd)
            raise UsageError(
                f"{option}={directory} is in use by another fusedrl run (pid {holder}); wait for "
                f"it to end or choose another {option}")
        if create:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self.made_directory = False  # claim's: it created the directory

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def _try_flock(fd: int, tries: int = 20) -> bool:
    """An exclusive flock on `fd` without waiting on a run; a few tries 10 ms apart ride out another
    command's probe (check_target holds the lock for microseconds)."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.01)
    return False


# The directories this process holds, by resolved path: taken by `claim` (for a training stage in
# run_setup.start_run, on rank 0), released when the stage's entry point returns
# (`releases_output_dir`).
_held: dict[Path, DirLock] = {}


def claim(path, kind: str, *, overwrite: bool, resume: bool = False, inputs: Iterable = (),
          option: str = "output_dir", overwrite_option: str = "overwrite=true",
          resume_option: str | None = None, empty: bool = True) -> DirLock:
    """Take the directory `path` for the command `kind`: check it (check_target; nothing is written
    into a directory that is refused), create it, lock it (a UsageError naming the holder's pid when
    another run holds it), check again under the lock, empty an earlier output when overwriting
    (unless `empty` is off: a command that replaces the directory whole, as export does), and
    mark it. The lock is held until `release(path)`; a directory it made is removed again when
    the command fails before writing anything into it (`release(path, failed=True)`)."""
    check = functools.partial(check_target, path, kind, overwrite=overwrite, resume=resume,
                              inputs=inputs, option=option, overwrite_option=overwrite_option,
                              resume_option=resume_option)
    check()
    p = Path(path)
    made = not p.exists()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{option}={path}: not a writable directory ({e.strerror})") from None
    lock = DirLock(p, option)
    lock.made_directory = made
    try:
        if check(probe_lock=False) and empty:
            _empty(p)
        marker = read_marker(p)
        # A directory holding only another command's marker (and no output) is this command's now.
        if marker is None or marker["kind"] != kind:
            write_marker(p, kind)
    except BaseException:
        lock.release()
        raise
    _held[p.resolve()] = lock
    return lock


def _empty(directory: Path) -> None:
    """Remove an earlier output's contents (links unlinked, never followed), keeping the held
    lock."""
    for entry in directory.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def entries(directory) -> set[str]:
    """Every path under `directory`, relative to it (links listed, never followed)."""
    found = set()
    for parent, dirs, files in os.walk(directory):
        found.update(os.path.relpath(os.path.join(parent, name), directory)
                     for name in dirs + files)
    return found


def check_unchanged(directory, before: set[str], option: str) -> None:
    """UsageError naming the first entry of `directory` that is not in `before` (its `entries` when
    the command took it) nor fusedrl's own: something another process put there while the command
    wrote, which replacing the directory would delete."""
    new = sorted(entries(directory) - before - set(_OURS))
    if new:
        raise UsageError(f"{option}={directory}: {new[0]} appeared in it while fusedrl was "
                         "writing, not made by fusedrl; nothing was replaced: move it out and run "
                         f"again, or choose another {option}")


def release(path, failed: bool = False) -> None:
    """Release this process's lock on `path`, if it holds one. failed: the command raised; a
    directory its claim created that still holds nothing but fusedrl's marker and lock is removed
    (a failed start leaves no directory behind; one that existed before is kept)."""
    lock = _held.pop(Path(path).resolve(), None)
    if lock is None:
        return
    directory = lock.path.parent
    if failed and lock.made_directory and entries(directory) <= set(_OURS):
        for name in _OURS:  # unlinked while the lock is held: no other run can take it between
            (directory / name).unlink(missing_ok=True)
        try:
            directory.rmdir()
        except OSError:  # something arrived meanwhile: it stays
            pass
    lock.release()


def releases_output_dir(entry: Callable) -> Callable:
    """Decorates a command's entry point `entry(cfg, ...)`: it runs on cfg with its paths pinned
    (run_paths.py: inputs absolute, output_dir where a link leads) before any of its code,
    and the lock it took on cfg.output_dir is released when it returns or raises (a directory it
    made and wrote nothing into removed when it raises), so the same process (or another) can take
    the directory next."""
    @functools.wraps(entry)
    def run(cfg, *args, **kwargs):
        cfg = pinned(cfg)
        try:
            result = entry(cfg, *args, **kwargs)
        except BaseException:
            release(cfg.output_dir, failed=True)
            raise
        release(cfg.output_dir)
        return result
    return run
