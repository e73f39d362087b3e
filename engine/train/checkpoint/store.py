"""Writing, finding, verifying and loading the checkpoints of a run directory (the layout is in
engine/train/checkpoint/__init__.py)."""
from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import torch

from ...runs.durable import (CorruptDirectory, check_finite, publish, temp_dir, verify_manifest,
                        write_manifest)
from ...errors import FusedRLError, NonFiniteError, UsageError
from ...parallel import distributed
from .parts import Trainables, rng_state, trainer_state
from .restore import Source, restore
from .shards import ShardReader, local_chunk, write_shards

PREFIX = "step-"
_NAME = re.compile(rf"{PREFIX}\d{{8}}")
CORRUPT_PREFIX = "corrupt-"
STATE_FILE = "checkpoint.json"
FORMAT, VERSION = "fusedrl-checkpoint", 1


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:08d}"


def save_checkpoint(run_dir, step: int, parts: Trainables, loop_state: dict, keep: int = 0) -> Path:
    """Write checkpoint `step` into a hidden temp sibling, then rename it into place; keep the
    newest `keep` checkpoints (0 = all). Collective: every rank calls it and writes its own
    shards; rank 0 creates the directory, writes checkpoint.json, seals and renames it."""
    final = checkpoint_dir(run_dir, step)
    tensors, data = trainer_state(parts)
    data["loop"] = loop_state
    own, python_rng = rng_state()
    # Checked before the first byte is written, on every rank alike.
    _check_finite_everywhere(tensors.items(), f"checkpoint {final}")
    _check_finite_data(data, f"checkpoint {final}")
    tmp = None
    if distributed.is_main():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(final)
    tmp = distributed.broadcast(tmp)
    try:
        index = write_shards(tmp, tensors, own, python_rng)
        distributed.barrier()  # every rank's shards are written before the manifest seals them
        if distributed.is_main():
            document = {"format": FORMAT, "version": VERSION,
                        "world_size": distributed.world_size(), **data, "tensors": index}
            (tmp / STATE_FILE).write_text(json.dumps(document, indent=1, allow_nan=False),
                                          encoding="utf-8")
            write_manifest(tmp)
            publish(tmp)
            # the same step saved again (e.g. a final save right after a periodic one)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep and distributed.is_main():
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    distributed.barrier()  # no rank reads the run directory before it is complete
    return final


def _check_finite_everywhere(named_tensors, what: str) -> None:
    """check_finite on this rank's chunks of the tensors, raised on every rank if any rank fails,
    so no rank is left waiting in the save's collectives."""
    try:
        check_finite(((name, local_chunk(t)[0]) for name, t in named_tensors), what)
        problem = None
    except NonFiniteError as e:
        problem = str(e)
    if distributed.world_size() > 1:
        problem = next((p for p in distributed.all_gather(problem) if p), None)
    if problem:
        raise NonFiniteError(problem)


def _check_finite_data(value, what: str, where: str = "") -> None:
    """NonFiniteError naming the first NaN or inf in plain data (the same on every rank)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise NonFiniteError(f"refusing to write {what}: {where.lstrip('.')!r} is {value} "
                             "(the run diverged; nothing was written)")
    items = (value.items() if isinstance(value, dict) else enumerate(value)
             if isinstance(value, (list, tuple)) else ())
    for key, item in items:
        _check_finite_data(item, what, f"{where}.{key}")


def open_checkpoint(path: Path) -> Source:
    """The verified checkpoint at `path` as a restore.Source."""
    try:
        document = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CorruptDirectory(f"{path / STATE_FILE}: not readable JSON ({e})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CorruptDirectory(f"{path / STATE_FILE}: not a fusedrl checkpoint")
    if document.get("version") != VERSION:
        raise UsageError(
            f"{path / STATE_FILE}: checkpoint format version {document.get('version')!r}, this "
            f"fusedrl reads version {VERSION}: resume with the fusedrl that wrote it")
    reader = ShardReader(path, document["tensors"])
    return Source(path, document["tensors"], reader.read, document, reader.own)


def load_checkpoint(path, parts: Trainables, check_loop=None) -> dict:
    """Verify checkpoint `path` (CorruptDirectory if it fails, or if its loop state fails
    `check_loop(path, loop state)`), check that it fits `parts` (CheckpointMismatch), restore every
    part and this rank's RNG states from it; returns the loop state. Any number of ranks loads a
    checkpoint written by any number of ranks."""
    path = Path(path)
    verify_manifest(path)
    return restore(open_checkpoint(path), parts, check_loop)


def read_tensors(path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The whole tensors of the checkpoint at `path` (verified first) whose names start with
    `prefix`, under their names without it: read_tensors(p, "models.model.") is that model's state
    dict (names in engine/train/checkpoint/parts.py)."""
    path = Path(path)
    verify_manifest(path)
    source = open_checkpoint(path)
    return {name.removeprefix(prefix): source.read(name, [0] * len(entry["shape"]), entry["shape"])
            for name, entry in source.index.items() if name.startswith(prefix)}


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints, oldest first (hidden temp dirs of interrupted saves are not listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))


def latest_checkpoint(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resume(run_dir, parts: Trainables, check_loop=None) -> tuple[Path | None, dict]:
    """Load the newest checkpoint that verifies (its loop state by `check_loop`: load_checkpoint);
    (its path, loop state), or (None, {}) when the run has none. A corrupt one is set aside as
    `corrupt-step-*` with a warning on stderr, and the previous tried. When none verifies (and so
    when only checkpoints set aside are left), a FusedRLError naming them: the run is not restarted
    from step 0, which would drop its metrics. With several ranks every rank verifies the same
    files (so all agree) and rank 0 sets it aside."""
    set_aside = False
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, parts, check_loop)
        except CorruptDirectory as e:
            set_aside = True  # on every rank alike: they verify the same files
            distributed.barrier()  # every rank is done reading it
            if not distributed.is_main():
                continue
            aside = path.with_name(CORRUPT_PREFIX + path.name)
            # an older copy of the same step set aside before
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            print(
                f"fusedrl: warning: checkpoint {path.name} is corrupt ({e}); moved to "
                f"{aside.name}, "
                "trying the previous one", file=sys.stderr)
    if set_aside:
        distributed.barrier()  # rank 0 has set every one aside before any rank lists them
    # Those set aside now, and by an earlier resume that was refused here: with no checkpoint
    # left, a rerun would otherwise start from step 0.
    root = Path(run_dir) / "checkpoints"
    corrupt = sorted(p.name for p in root.iterdir() if p.is_dir()
                     and p.name.startswith(CORRUPT_PREFIX + PREFIX)) if root.is_dir() else []
    if corrupt:
        named = ", ".join(corrupt if len(corrupt) <= 4 else
                          [*corrupt[:3], f"and {len(corrupt) - 3} more"])
        raise FusedRLError(
            f"no checkpoint of {run_dir} verifies: every one is corrupt and set aside in {root} "
            f"({named}); the run is not restarted from step 0 on its own: rerun with "
            "train.overwrite=true to start it again (its checkpoints and metrics deleted)")
    return None, {}
