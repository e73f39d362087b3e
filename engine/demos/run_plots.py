"""The demos' PNG curves, each run's drawn in a child process the moment the run ends, beside the
demo's next stage instead of after its last one.

Drawing is matplotlib's CPU work: a PPO run's ~50 panels take about 2 s, the demo's six PNGs about
4 s on 2 cores, all of it added to the demo's wall time when drawn at the end. A child process
draws them while the parent trains the next stage (a GPU run's host is busy on one core; a CPU
run's torch leaves part of a core free on this repository's 2). One spawned process: the plots
are drawn in the order the runs end, and the parent's threads and CUDA state are never forked.
"""
from __future__ import annotations

from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path


class RunPlots:
    """`with RunPlots() as plots:` ... `plots.add(run_dir)` as each run ends ... `plots.paths()`.

    `add` queues engine/train/plot.py's `plot_run(run_dir)` (RUN/plots/train.png and eval.png) in
    the child; `paths` waits for every queued run and returns the files written, in the order the
    runs were added, raising the first plot's error as plot_run raised it. Leaving the block waits
    for the plots still drawing (those not started are dropped when the block ends by an error)."""

    def __init__(self):
        self._pool: ProcessPoolExecutor | None = None
        self._queued: list[Future] = []

    def __enter__(self) -> "RunPlots":
        # The child starts at the first add: the demo's setup and first stage pay nothing for it.
        self._pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._pool.shutdown(wait=True, cancel_futures=kind is not None)

    def add(self, run_dir: str | Path) -> None:
        """Queue the curves of the finished run at `run_dir`."""
        if self._pool is None:
            raise RuntimeError("RunPlots.add outside its `with` block")
        self._queued.append(self._pool.submit(_draw, Path(run_dir)))

    def paths(self) -> list[str]:
        """The PNGs of every run added, once drawn."""
        return [str(path) for plot in self._queued for path in plot.result()]


def _draw(run_dir: Path) -> list[Path]:
    """The child's work: plot_run imported there (matplotlib loads in the child only)."""
    from ..train.plot import plot_run

    return plot_run(run_dir)
