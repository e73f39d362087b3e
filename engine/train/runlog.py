"""The run directory's log side: resolved config, metrics JSONL, progress on stderr (progress.py),
the experiment trackers of train.report_to (trackers.py).

RUN_DIR/
    .fusedrl-run      marks the directory as a fusedrl run; .fusedrl-run.lock: the running process's
                      lock (engine/runs/run_dir.py)
    config.yaml       the resolved config (file + overrides + defaults) the run used; its last
                      line, a comment, records the number of ranks: `# world_size: N`
    metrics.jsonl     one JSON object per line: {"kind": "train"|"eval"|"info", "step": ..., ...};
                      one series: a run resumed at step S first drops the records past S
    tensorboard/      event files, with train.report_to=tensorboard (wandb/: with wandb)
    checkpoints/      see engine/train/checkpoint/
    final/            the exported model
`fusedrl plot RUN_DIR` reads metrics.jsonl back. config.yaml and a rewritten metrics.jsonl are
replaced whole (engine/runs/durable.py); appends never go through a symbolic link.
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

import torch
import yaml

from ..config import io as config_io
from ..config.resume import METRICS_FILE
from ..runs.durable import open_append, write_text_atomic
from .progress import open_progress
from .trackers import Trackers
from .data_record import DATA_RECORD

# The entries of RUN_DIR written through a hidden temp sibling (runs/durable.py), as a regex: the
# only names whose leftovers a new run removes from it.
REPLACED_WHOLE = r"final\w*|config\.yaml|metrics\.jsonl|" + re.escape(DATA_RECORD)


class RunLog:
    """Appends metrics to RUN_DIR/metrics.jsonl (and the trackers); drives the progress display."""

    def __init__(self, run_dir, config, total_steps: int, first_step: int = 0,
                 progress: bool = True, trackers: list[str] = (), world_size: int = 1):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        settings = config_io.to_dict(config)
        # The world size as a comment: the file stays loadable as a config.
        write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(settings, sort_keys=False)
                          + f"# world_size: {world_size}\n")
        keep_series(self.run_dir / METRICS_FILE, first_step)
        self._metrics = open_append(self.run_dir / METRICS_FILE)
        self._trackers = Trackers(list(trackers), self.run_dir, settings)
        self._progress = (open_progress(self.run_dir.name, total_steps, first_step) if progress
                          else None)

    def log(self, kind: str, step: int, metrics: dict):
        """Write one record; train records also advance the progress display to `step`."""
        self._metrics.write(metrics_line(kind, step, metrics))
        self._metrics.flush()  # a crashed run keeps every line written so far
        self._trackers.log(kind, step, _plain(metrics))
        if self._progress is not None and kind != "info":
            self._progress.show(kind, step, metrics)

    def notice(self, step: int, message: str):
        """A message for the user: an info record, and a line on stderr (above a progress bar)."""
        self.log("info", step, {"notice": message})
        if self._progress is not None:
            self._progress.write(f"fusedrl: {message}")
        else:
            print(f"fusedrl: {message}", file=sys.stderr, flush=True)

    def close(self):
        self._metrics.close()
        self._trackers.close()
        if self._progress is not None:
            self._progress.close()


class SilentLog:
    """The run log of every rank but 0: rank 0 writes the one metrics file (with reduced
    metrics)."""

    def log(self, kind: str, step: int, metrics: dict):
        pass

    def notice(self, step: int, message: str):
        pass

    def close(self):
        pass


def metrics_line(kind: str, step: int, metrics: dict) -> str:
    """One metrics.jsonl line: {"kind", "step", "time", **metrics}."""
    row = {"kind": kind, "step": step, "time": round(time.time(), 3), **_plain(metrics)}
    return json.dumps(row) + "\n"


def keep_series(path: Path, last_step: int):
    """Drop the records past `last_step` (all of them for a fresh start, last_step 0) from a
    metrics file, so a resumed run continues one series instead of starting a second; atomic. A
    line that is not a record (torn by a crash, even inside a multi-byte character) goes too."""
    if not path.exists():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if last_step > 0 and _step_of(line) <= last_step]
    if len(kept) == len(lines):
        return
    write_text_atomic(path, b"".join(kept).decode("utf-8"))  # each kept line parsed as UTF-8 JSON


def _step_of(line: bytes) -> float:
    """A record's step; a torn or malformed line (a crash mid-write, even inside a multi-byte
    character: json.loads decodes the bytes and raises a ValueError) sorts last, so it is
    dropped."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        return math.inf
    return step if is_step(step) else math.inf


def is_step(value) -> bool:
    """Whether `value` is a record's step: a finite number (not a bool)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def append_metrics(run_dir, kind: str, step: int, metrics: dict):
    """Add one record to a run's metrics.jsonl outside a RunLog (e.g. after training)."""
    with open_append(Path(run_dir) / METRICS_FILE) as f:
        f.write(metrics_line(kind, step, metrics))


def _plain(metrics: dict) -> dict:
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}


def read_metrics(run_dir) -> list[dict]:
    """All records (JSON objects) of RUN_DIR/metrics.jsonl; a line that is not one is ignored: a
    torn last line from a crash, even one torn inside a multi-byte character."""
    rows = []
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: not a fusedrl run directory")
    # Decoded line by line: one line that is not UTF-8 drops that line, not the file.
    for line in path.read_bytes().splitlines():
        try:
            row = json.loads(line)  # bytes: a line that is not UTF-8 is a ValueError too
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_tensors(tensors: list) -> list[float]:
    """0-dim tensors -> their values as floats (float64), one host sync per device they are on:
    one, unless train.optimizer_offload put the gradient norms on the CPU beside GPU stats."""
    by_device: dict = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out = [0.0] * len(tensors)
    for index in by_device.values():
        for i, value in zip(index,
                            torch.stack(
                                [tensors[i].detach().double().reshape(()) for i in index]).tolist(
                                    )):
            out[i] = value
    return out


def host_values(values: dict) -> dict:
    """{name: 0-dim tensor or Python number} -> {name: float or the number}: one host sync for all
    the tensors (a step's stats stay on the device until then; read_tensors)."""
    names = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    if not names:
        return dict(values)
    return {**values, **dict(zip(names, read_tensors([values[k] for k in names])))}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: allocated CUDA memory on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB
