"""PNG curves of a run's metrics.jsonl (`fusedrl plot RUN_DIR`, and the demo's plots).

Writes RUN_DIR/plots/train.png and, when the run evaluated, RUN_DIR/plots/eval.png: one panel per
numeric metric against the step. Each PNG carries a text chunk marking it as fusedrl's (PLOT_MARK):
a plot writes a new file or replaces its own earlier PNG, never anything else at that name (a user's
file, a link, a FIFO), and never writes through a link (the folder itself may not be one). A PNG is
written whole under a hidden temp name and then linked (new) or renamed (an earlier plot) into
place.
"""
from __future__ import annotations

import math
import os
import stat
import tempfile
from pathlib import Path

from ..errors import UsageError

# The PNG text chunk (keyword, text) marking a file as written by fusedrl's plot.
PLOT_MARK = ("fusedrl", "plot")

# Bookkeeping fields of every record, not curves.
_NOT_CURVES = {"kind", "step", "time", "epoch"}


def curves(rows: list[dict], kind: str) -> dict[str, tuple[list, list]]:
    """metric -> (steps, values) over the records of `kind`, numeric finite values only; a record
    that is not a JSON object or has no numeric step (a hand-edited or foreign line) is skipped."""
    from .runlog import is_step

    out: dict[str, tuple[list, list]] = {}
    for row in rows:
        if not isinstance(row, dict) or row.get("kind") != kind or not is_step(row.get("step")):
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
    option = "--out" if out_dir else "the plot folder"
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    if out_dir.is_symlink():
        raise UsageError(f"{option} {out_dir} is a symbolic link: fusedrl plot never writes "
                         "through one; give the directory it leads to")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in ("train", "eval"):
        series = curves(rows, kind)
        if not series:
            continue
        cols = min(3, len(series))
        rows_n = math.ceil(len(series) / cols)
        width, height = 4.5 * cols, 3 * rows_n
        # Fixed margins in inches (panels of a fixed size), not tight_layout: that draws the
        # figure once more to measure it, a second of CPU per dozen panels (PPO logs ~50).
        grid = {"left": 0.6 / width, "right": 1 - 0.2 / width, "bottom": 0.5 / height,
                "top": 1 - 0.6 / height, "wspace": 0.3, "hspace": 0.55}
        fig, axes = plt.subplots(rows_n, cols, figsize=(width, height), squeeze=False,
                                 gridspec_kw=grid)
        for ax, (key, (steps, values)) in zip(axes.flat, sorted(series.items())):
            ax.plot(steps, values, marker="." if len(steps) < 30 else None)
            # The title's place given (matplotlib otherwise measures every tick label to lift it
            # over top-side ticks, which these panels lack) and at most 4 ticks an axis: ticks
            # are most of a panel's drawing (the demo's plots: 4.1 -> 3.1 s of CPU).
            ax.set_title(key, y=1.0)
            ax.locator_params(nbins=4)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(series):]:
            ax.axis("off")
        fig.suptitle(f"{Path(run_dir).name}: {kind}", y=1 - 0.15 / height, va="top")
        path = out_dir / f"{kind}.png"
        try:
            write_png(fig, path)
        finally:
            plt.close(fig)
        written.append(path)
    return written


def write_png(fig, path: Path) -> None:
    """Save the matplotlib figure `fig` as the marked PNG `path`: a new file, or over an earlier
    fusedrl plot; a UsageError naming `path` when anything else is there (nothing is written)."""
    earlier = _refuse_foreign(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, dpi=100, format="png", metadata=dict([PLOT_MARK]))
        os.chmod(tmp, 0o644)
        if earlier:
            # Replaces the name: a link put there meanwhile is replaced, not followed.
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if anything appeared at the name since the check
            except FileExistsError:
                raise UsageError(f"{path} appeared while fusedrl plot was writing it: not "
                                 "replaced") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _refuse_foreign(path: Path) -> bool:
    """Whether `path` holds an earlier fusedrl plot (False: nothing there); UsageError when it
    holds anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISREG(mode) and is_plot(path):
        return True
    what = "a symbolic link" if stat.S_ISLNK(mode) else "a file fusedrl plot did not write"
    raise UsageError(f"{path} is {what}: fusedrl plot never replaces it; move it or give --out "
                     "another folder")


def is_plot(path: Path) -> bool:
    """Whether the regular file `path` is a PNG that fusedrl plot wrote (it carries PLOT_MARK)."""
    from PIL import Image, UnidentifiedImageError  # matplotlib's own dependency

    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get(PLOT_MARK[0]) == PLOT_MARK[1]
    except (OSError, UnidentifiedImageError, ValueError):
        return False
