"""PNG curves of a run's metrics.jsonl (`fusedrl plot RUN_DIR`, and the demo's plots).

Writes RUN_DIR/plots/train.png and, when the run evaluated, RUN_DIR/plots/eval.png: one panel per
numeric metric against the step.
"""
from __future__ import annotations

import math
from pathlib import Path

# Bookkeeping fields of every record, not curves.
_NOT_CURVES = {"kind", "step", "time", "epoch"}


def curves(rows: list[dict], kind: str) -> dict[str, tuple[list, list]]:
    """metric -> (steps, values) over the records of `kind`, numeric finite values only."""
    out: dict[str, tuple[list, list]] = {}
    for row in rows:
        if row.get("kind") != kind:
            continue
        for key, value in row.items():
            if key in _NOT_CURVES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                steps, values = out.setdefault(key, ([], []))
                steps.append(row["step"])
                values.append(value)
    return out


def plot_run(run_dir, out_dir=None) -> list[Path]:
    """Write one PNG per record kind with curves; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from .runlog import read_metrics

    rows = read_metrics(run_dir)
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in ("train", "eval"):
        series = curves(rows, kind)
        if not series:
            continue
        cols = min(3, len(series))
        rows_n = math.ceil(len(series) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3 * rows_n), squeeze=False)
        for ax, (key, (steps, values)) in zip(axes.flat, sorted(series.items())):
            ax.plot(steps, values, marker="." if len(steps) < 30 else None)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(series):]:
            ax.axis("off")
        fig.suptitle(f"{Path(run_dir).name}: {kind}")
        fig.tight_layout()
        path = out_dir / f"{kind}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
