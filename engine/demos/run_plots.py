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
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path


class RunPlots:
    """`with RunPlots() as plots:` ... `plots.add(run_dir)` as each run ends ... `plots.paths()`.

    `add` queues engine/train/plot.py's `plot_run(run_dir)` (RUN/plots/train.png and eval.png) in
    the child; `paths` waits for every queued run and returns the files written, in the order the
    runs were added, raising the first plot's error as plot_run raised it. A run the child could
    not draw because it died (killed, or unable to start: a script without a `__main__` guard)
    is drawn here instead. Leaving the block waits for the plots still drawing (those not started
    are dropped when the block ends by an error)."""

    def __init__(self):
        self._pool: ProcessPoolExecutor | None = None
        self._queued: list[tuple[Path, Future]] = []

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
        try:
            plot = self._pool.submit(_draw, Path(run_dir))
        except BrokenProcessPool as error:  # the child died earlier: `paths` draws this one here
            plot = Future()
            plot.set_exception(error)
        self._queued.append((Path(run_dir), plot))

    def paths(self) -> list[str]:
        """The PNGs of every run added, once drawn."""
        drawn = []
        for run_dir, plot in self._queued:
            try:
                drawn += plot.result()
            except BrokenProcessPool:
                drawn += _draw(run_dir)
        return [str(path) for path in drawn]


def _draw(run_dir: Path) -> list[Path]:
    """The child's work (the parent's if the child died): plot_run imported there, so matplotlib
    loads in the child only."""
    from ..train.plot import plot_run

    return plot_run(run_dir)
