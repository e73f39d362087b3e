"""What makes a written directory safe to rely on: written under a hidden temp name and renamed
(readers never see half of it), nothing non-finite in it, a manifest to verify it by, modes that
let others read it, and no temp leftovers from writes that were killed.

Used by the model export (engine/model/hf_io.py) and the training checkpoints
(engine/train/checkpoint.py), so both follow the same rules.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from .errors import FusedRLError, NonFiniteError

MANIFEST = "manifest.json"
_TEMP_MARKERS = (".tmp-", ".old-")  # the hidden siblings of temp_dir(): `.NAME.tmp-XXXX`, `.NAME.old-XXXX`


class CorruptDirectory(FusedRLError):
    """A written directory whose files do not match its manifest (truncated, altered, missing)."""


def temp_dir(final: Path, kind: str = "tmp") -> Path:
    """A new hidden sibling of `final` to write into (kind "tmp") or to move an old copy aside ("old")."""
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.{kind}-", dir=final.parent))


def remove_leftovers(directory) -> list[Path]:
    """Remove the temp siblings that killed writes left in `directory`; returns what was removed.
    Only for a directory this process alone writes into (a run's output_dir)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir()
             if p.name.startswith(".") and any(m in p.name for m in _TEMP_MARKERS)]
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return found


def check_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """NonFiniteError naming the first tensor with a NaN or inf: checked before anything is written.
    One reduction per floating tensor (and one host sync each, at save time only)."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"refusing to write {what}: {name!r} holds NaN or inf "
                                 "(the run diverged; nothing was written)")


def publish(directory: Path) -> None:
    """Give a finished temp directory the modes a normal write would (0644 files and 0755 dirs under
    the default umask 022): mkdtemp makes it 0700, which would hide the export from other users
    and serving processes. The umask is the knob for other modes (e.g. umask 077 keeps it private)."""
    umask = _umask()
    os.chmod(directory, 0o777 & ~umask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


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
    """CorruptDirectory unless every file of the manifest is there with its size and hash."""
    manifest = directory / MANIFEST
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CorruptDirectory(f"{directory}: no readable {MANIFEST} ({e})") from None
    for name, entry in entries.items():
        path = directory / name
        if not path.is_file():
            raise CorruptDirectory(f"{path}: missing")
        if path.stat().st_size != entry["size"]:
            raise CorruptDirectory(f"{path}: {path.stat().st_size} bytes, expected {entry['size']}")
        if _digest(path) != entry["sha256"]:
            raise CorruptDirectory(f"{path}: contents differ from when it was written")
