"""A run's record, kept current row by row: each row appended to DIR/results.jsonl the moment it
is measured, DIR/results.json and DIR/results.md rewritten (written, then renamed: a reader, or a
run stopped by SIGTERM or Ctrl-C, always finds valid files holding every finished row), and one
progress line printed per row (case, implementation, figure, elapsed, what is left). The files
are standard JSON: a figure that is not finite (NaN, inf) is recorded as null and named in the row's
`not_finite` list."""
from __future__ import annotations

import json
import math
import os
import time

from fusedrl.engine.runs import run_dir

from . import results
from .options import BENCH_KIND

# The figure a progress line shows, the first a row has (a rate, else its time).
PROGRESS_FIGURES = (("tok_s", "tok/s"), ("tokens_per_s", "tok/s"),
                    ("tokens_per_s_per_gpu", "tok/s/GPU"))


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def finite(value, path: str = "", bad: list[str] | None = None):
    """`value` with every non-finite float (NaN, inf) inside it, dicts and lists included, made
    None; each one's path (`key`, `key.sub`, `key[2]`) appended to `bad`."""
    if isinstance(value, float) and not math.isfinite(value):
        if bad is not None:
            bad.append(path)
        return None
    if isinstance(value, dict):
        return {k: finite(v, f"{path}.{k}" if path else str(k), bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v, f"{path}[{i}]", bad) for i, v in enumerate(value)]
    return value


def finite_row(row: dict) -> dict:
    """`row` made finite in place: each non-finite figure None, and named in `not_finite`."""
    bad: list[str] = []
    for key in [k for k in row if k not in results.LABELS]:
        row[key] = finite(row[key], key, bad)
    if bad:
        row["not_finite"] = [*(row.get("not_finite") or []), *bad]
    return row


def figure_text(row: dict) -> str:
    """The row's main figure for the progress line: a rate, or its time with the spread."""
    if row.get("status") != "ok":
        return row.get("status", "")
    for key, unit in PROGRESS_FIGURES:
        if row.get(key) is not None:
            return f"{row[key]:.4g} {unit}"
    seconds = row.get("seconds")
    if seconds is None:
        return "ok"
    spread = (f" (p20 {row['seconds_p20'] * 1e3:.3g}, p80 {row['seconds_p80'] * 1e3:.3g}, "
              f"n {row.get('n')})" if row.get("seconds_p20") is not None
              and row.get("seconds_p80") is not None else "")
    return f"{seconds * 1e3:.4g} ms{spread}"


class Recorder:
    """The payload {"meta", "rows"} of one run, written after every row (output_dir None: only
    printed; quiet: not even that, a torchrun rank other than 0). output_dir is taken as every
    fusedrl command takes its directory (engine/runs/run_dir.py: claim): refused unless new, empty
    or an earlier bench run, which is emptied first only with `overwrite`; marked as a bench run
    and locked until `close`. `inputs`: what the run reads, never replaced."""

    def __init__(self, output_dir: str | None, meta: dict, quiet: bool = False,
                 overwrite: bool = False, inputs: tuple = ()):
        self.output_dir, self.quiet = output_dir, quiet
        self.payload = {"meta": meta, "rows": []}
        self.start = time.monotonic()
        if output_dir:
            run_dir.claim(output_dir, BENCH_KIND, overwrite=overwrite, inputs=inputs)
            # Claimed: the directory holds nothing but the marker and the lock.
            open(self.path("results.jsonl"), "w", encoding="utf-8").close()
            self.rewrite()

    def path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def rewrite(self) -> None:
        if self.output_dir:  # rows are finite as added; meta is made so here (standard JSON)
            payload = {**self.payload, "meta": finite(self.payload["meta"])}
            _write_atomic(self.path("results.json"),
                          json.dumps(payload, indent=2, allow_nan=False))
            _write_atomic(self.path("results.md"), results.markdown(payload))

    def add(self, row: dict, left: str) -> None:
        """Record `row` (appended, files rewritten) and print its progress line; left: what is
        left of the run, as the line says it. A figure that is not finite is recorded as None and
        named in the row's `not_finite`."""
        row["elapsed_s"] = round(self.elapsed(), 3)
        finite_row(row)
        self.payload["rows"].append(row)
        if self.output_dir:
            with open(self.path("results.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")
            self.rewrite()
        if not self.quiet:
            bad = f" (not finite: {', '.join(row['not_finite'])})" if row.get("not_finite") else ""
            print(f"[{self.elapsed():7.1f} s] {row['suite']}: {row['name']} | {row['impl']} | "
                  f"{figure_text(row)}{bad} | {left}", flush=True)

    def close(self, ended: str) -> list[str]:
        """The final files (ended: "complete" or why the run stopped) and, for a complete run,
        the charts; returns the paths written."""
        self.payload["meta"]["ended"] = ended
        self.payload["meta"]["wall_s"] = round(self.elapsed(), 3)
        if not self.output_dir:
            return []
        try:
            self.rewrite()
            written = [self.path("results.json"), self.path("results.md"),
                       self.path("results.jsonl")]
            if ended == "complete":
                from .charts import draw_charts
                written += draw_charts(self.payload, self.output_dir)
        finally:
            run_dir.release(self.output_dir)
        return written
