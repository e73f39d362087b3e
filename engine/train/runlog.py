"""The run directory's log side: resolved config, metrics JSONL, progress bar, optional TensorBoard.

RUN_DIR/
    config.yaml       the resolved config (file + overrides + defaults) the run used; its last
                      line, a comment, records the number of ranks: `# world_size: N`
    metrics.jsonl     one JSON object per line: {"kind": "train"|"eval"|"info", "step": ..., ...}
    tensorboard/      event files, when enabled
    checkpoints/      see engine/train/checkpoint.py
    final/            the exported model
`fusedrl plot RUN_DIR` reads metrics.jsonl back.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..config import io as config_io

METRICS_FILE = "metrics.jsonl"
# Shown in the progress bar, when present, in this order.
_BAR_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "accuracy", "score_mean", "kl")


class RunLog:
    """Appends metrics to RUN_DIR/metrics.jsonl (and TensorBoard); drives the progress bar."""

    def __init__(self, run_dir, config, total_steps: int, first_step: int = 0,
                 progress: bool = True, tensorboard: bool = False, world_size: int = 1):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_io.save_yaml(config, self.run_dir / "config.yaml")
        with (self.run_dir / "config.yaml").open("a", encoding="utf-8") as f:
            f.write(f"# world_size: {world_size}\n")  # a comment: the file stays loadable as a config
        self._metrics = (self.run_dir / METRICS_FILE).open("a", encoding="utf-8")
        self._tb = _tensorboard_writer(self.run_dir / "tensorboard") if tensorboard else None
        self._bar = None
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=first_step, desc=self.run_dir.name, unit="step",
                             dynamic_ncols=True)

    def log(self, kind: str, step: int, metrics: dict):
        """Write one record; train records also advance the progress bar to `step`."""
        self._metrics.write(metrics_line(kind, step, metrics))
        self._metrics.flush()  # a crashed run keeps every line written so far
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
        if self._bar is not None:
            if kind == "train":
                self._bar.update(step - self._bar.n)
            shown = {k: metrics[k] for k in _BAR_KEYS if k in metrics}
            self._bar.set_postfix({f"{kind[0]}.{k}": f"{v:.4g}" for k, v in shown.items()}, refresh=True)

    def close(self):
        self._metrics.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


class SilentLog:
    """The run log of every rank but 0: rank 0 writes the one metrics file (with reduced metrics)."""

    def log(self, kind: str, step: int, metrics: dict):
        pass

    def close(self):
        pass


def metrics_line(kind: str, step: int, metrics: dict) -> str:
    """One metrics.jsonl line: {"kind", "step", "time", **metrics}."""
    row = {"kind": kind, "step": step, "time": round(time.time(), 3), **_plain(metrics)}
    return json.dumps(row) + "\n"


def append_metrics(run_dir, kind: str, step: int, metrics: dict):
    """Add one record to a run's metrics.jsonl outside a RunLog (e.g. after training)."""
    with (Path(run_dir) / METRICS_FILE).open("a", encoding="utf-8") as f:
        f.write(metrics_line(kind, step, metrics))


def _plain(metrics: dict) -> dict:
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's writer needs the tensorboard package
        raise RuntimeError("train.tensorboard=true needs the tensorboard package "
                           "(pip install 'fusedrl[tensorboard]')") from e
    return SummaryWriter(str(path))


def read_metrics(run_dir) -> list[dict]:
    """All records of RUN_DIR/metrics.jsonl (a torn last line from a crash is ignored)."""
    rows = []
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: not a fusedrl run directory")
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: allocated CUDA memory on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB
