"""What makes a written directory safe to rely on: written under a hidden temp name and renamed
(readers never see half of it), nothing non-finite in it, a manifest to verify it by, modes that
let others read it, every file and directory fsynced before the rename (so a power cut leaves the
old copy or the new one, never a torn one), and no temp leftovers from writes that were killed.
Renames replace a symbolic link at the destination; they never write through it.

Used by the model export (engine/model/hf_io.py), the adapters (engine/model/peft_io.py), the
training checkpoints (engine/train/checkpoint/) and the run log's files, so all follow the same
rules. Torch-free (torch is imported by check_finite alone), so the command line's checks can use
it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import FusedRLError, NonFiniteError

MANIFEST = "manifest.json"
# The hidden siblings temp_dir() and write_text_atomic() make: `.NAME.tmp-XXXX`, `.NAME.old-XXXX`.
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-\w+")


class CorruptDirectory(FusedRLError):
    """A written directory whose files do not match its manifest (truncated, altered, missing)."""


def temp_dir(final: Path, kind: str = "tmp") -> Path:
    """A new hidden sibling of `final` to write into (kind "tmp") or to move an old copy aside
    ("old")."""
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.{kind}-", dir=final.parent))


def remove_leftovers(directory, names: str) -> list[Path]:
    """Remove the temp siblings that killed writes left in `directory` for the entries whose full
    names match the regex `names` (e.g. `.final.tmp-XXXX` for "final"); returns what was removed.
    Only for a directory this process alone writes into, made by fusedrl (a run's output_dir, held
    under its lock): a user's `.notes.tmp-1` never matches. A link is unlinked, never followed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir()
             if (m := _TEMP_NAME.fullmatch(p.name)) and re.fullmatch(names, m["name"])]
    for path in found:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return found


def check_finite(named_tensors: Iterable[tuple[str, "torch.Tensor"]], what: str) -> None:
    """NonFiniteError naming the first tensor with a NaN or inf: checked before anything is written.
    One reduction per floating tensor (and one host sync each, at save time only)."""
    import torch

    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise non_finite_error(name, what)


def non_finite_error(name: str, what: str) -> NonFiniteError:
    """The error refusing to write `what` because tensor `name` holds a NaN or inf."""
    return NonFiniteError(
        f"refusing to write {what}: {name!r} holds NaN or inf (the run diverged; nothing was "
        "written)")


def publish(directory: Path) -> None:
    """Make a finished temp directory ready to be renamed into place: the modes a normal write
    would give (0644 files and 0755 dirs under the default umask 022: mkdtemp makes it 0700, which
    would hide the export from other users and serving processes; the umask is the knob for other
    modes, e.g. umask 077 keeps it private), and every file and directory in it fsynced, deepest
    first, then its parent (which holds the temp directory's name)."""
    umask = _umask()
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, 0o666 & ~umask)
            _fsync(path, os.O_RDONLY)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        sync_dir(root)
    os.chmod(directory, 0o777 & ~umask)
    sync_dir(Path(directory).parent)


def sync_dir(path) -> None:
    """fsync a directory: the names created, renamed or removed in it survive a power cut."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path, flags: int) -> None:
    fd = os.open(path, flags | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def written_whole(final, before_rename: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yields a new hidden temp sibling of the directory `final` to write into; when the block ends,
    seals it (write_manifest), publishes it, calls `before_rename()` (a last check of `final`,
    which may raise) and renames it over `final` (replace_dir); when the block or the check
    raises, removes it, and `final` is as it was."""
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(final)
    try:
        yield tmp
        write_manifest(tmp)
        publish(tmp)
        if before_rename is not None:
            before_rename()
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the published `tmp` to `final`; an existing `final` (a directory the caller owns) is
    moved aside first and removed after, so `final` is whole at every moment; the rename is
    fsynced."""
    if final.exists() or final.is_symlink():
        old = temp_dir(final, "old")
        os.rename(final, old / final.name)  # a link is moved aside itself, never followed
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    sync_dir(final.parent)


def write_text_atomic(path, text: str) -> None:
    """Write a small text file whole or not at all: a hidden temp sibling, fsynced, renamed over
    `path` (replacing a symbolic link there instead of writing through it), then the directory
    fsynced."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_dir(path.parent)


def open_append(path):
    """`path` opened for appending text (created if missing); a symbolic link there is an OSError
    (ELOOP) instead of a write into whatever it points at."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    return os.fdopen(fd, "a", encoding="utf-8")


def _umask() -> int:
    """The process's umask: from /proc on Linux; elsewhere by setting it and back (which briefly
    changes it for every thread, hence the preference)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: Path) -> None:
    """Record every file's size and sha256 in directory/manifest.json; written last, so a manifest
    vouches for a complete directory."""
    entries = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _digest(p)}
               for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / MANIFEST).write_text(json.dumps(entries, indent=1), encoding="utf-8")


def verify_manifest(directory: Path) -> None:
    """CorruptDirectory unless every file of the manifest is there with its size and hash; a name
    that leads out of `directory` (`../x`, an absolute path, a link out) is corrupt too, never
    read."""
    manifest = directory / MANIFEST
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CorruptDirectory(f"{directory}: no readable {MANIFEST} ({e})") from None
    if not isinstance(entries, dict):
        raise CorruptDirectory(f"{manifest}: expected a mapping of file names")
    root = Path(directory).resolve()
    for name, entry in entries.items():
        path = directory / name
        if root not in path.resolve().parents:
            raise CorruptDirectory(f"{manifest}: names {name!r}, outside {directory}")
        sealed = isinstance(entry, dict) and isinstance(entry.get("size"), int)
        if not (sealed and isinstance(entry.get("sha256"), str)):
            raise CorruptDirectory(f"{manifest}: the entry of {name!r} is not {{size, sha256}}")
        if not path.is_file():
            raise CorruptDirectory(f"{path}: missing")
        if path.stat().st_size != entry["size"]:
            raise CorruptDirectory(f"{path}: {path.stat().st_size} bytes, expected {entry['size']}")
        if _digest(path) != entry["sha256"]:
            raise CorruptDirectory(f"{path}: contents differ from when it was written")
