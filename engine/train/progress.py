"""The run's progress on stderr: a live tqdm bar on a terminal; in a log file (stderr not a
terminal, `fusedrl sft ... > log 2>&1`, a cluster job's output) plain lines instead, never a `\r`:
one per logged train record (train.log_every), at most one each LINE_EVERY_S seconds, plus the
first and the last, each with the step, the record's main metrics and the rate.
"""
from __future__ import annotations

import sys
import time

# Shown, when present, in this order.
SHOWN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "accuracy", "score_mean", "kl",
              "skipped_steps")
LINE_EVERY_S = 30.0  # a log file's lines at most this often (tqdm redraws 10 times a second)


def shown_metrics(metrics: dict) -> dict[str, str]:
    """{name: value in 4 significant digits} of a record's SHOWN_KEYS (skipped_steps when > 0)."""
    return {k: f"{metrics[k]:.4g}" for k in SHOWN_KEYS
            if isinstance(metrics.get(k), (int, float)) and (k != "skipped_steps" or metrics[k])}


def open_progress(name: str, total_steps: int, first_step: int, stream=None):
    """A Bar on a terminal, else Lines; `stream`: where it writes (default stderr)."""
    stream = stream or sys.stderr
    is_terminal = getattr(stream, "isatty", lambda: False)()
    return (Bar if is_terminal else Lines)(name, total_steps, first_step, stream)


class Bar:
    """tqdm's live bar, the last record's metrics as its postfix."""

    def __init__(self, name: str, total_steps: int, first_step: int, stream):
        from tqdm.auto import tqdm
        self._stream = stream
        self._bar = tqdm(total=total_steps, initial=first_step, desc=name, unit="step",
                         dynamic_ncols=True, file=stream)

    def show(self, kind: str, step: int, metrics: dict) -> None:
        if kind == "train":
            self._bar.update(step - self._bar.n)
        postfix = {f"{kind[0]}.{k}": v for k, v in shown_metrics(metrics).items()}
        self._bar.set_postfix(postfix, refresh=True)

    def write(self, message: str) -> None:
        self._bar.write(message, file=self._stream)

    def close(self) -> None:
        self._bar.close()


class Lines:
    """Plain lines: `NAME train step 12/100 loss 2.31 lr 0.0003 ... | 4.1 steps/s, eta 21s`; eval
    records each get a line of their own."""

    def __init__(self, name: str, total_steps: int, first_step: int, stream,
                 every_s: float = LINE_EVERY_S):
        self.name, self.total, self.first = name, total_steps, first_step
        self.stream, self.every_s = stream, every_s
        self.start = time.monotonic()
        self.last_line = None  # monotonic time of the last train line

    def show(self, kind: str, step: int, metrics: dict) -> None:
        now = time.monotonic()
        if kind == "train":
            recent = self.last_line is not None and now - self.last_line < self.every_s
            if recent and step < self.total:
                return
            self.last_line = now
        values = " ".join(f"{k} {v}" for k, v in shown_metrics(metrics).items())
        line = f"{self.name} {kind} step {step}/{self.total}" + (f" {values}" if values else "")
        done, seconds = step - self.first, now - self.start
        if kind == "train" and done > 0 and seconds > 0:
            rate = done / seconds
            line += f" | {rate:.3g} steps/s, eta {(self.total - step) / rate:.0f}s"
        self.write(line)

    def write(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def close(self) -> None:
        pass
