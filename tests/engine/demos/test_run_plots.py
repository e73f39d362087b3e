"""The demos' plots drawn in a child process as each run ends (engine/demos/run_plots.py)."""
import json
import multiprocessing
import os
import signal

import pytest

from fusedrl.engine.demos import run_plots
from fusedrl.engine.errors import UsageError
from fusedrl.engine.train import plot

pytest.importorskip("matplotlib")


def finished_run(path, steps: int):
    """A run folder whose metrics.jsonl holds `steps` train records and one eval record."""
    path.mkdir()
    rows = [{"kind": "train", "step": s, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, steps + 1)]
    rows.append({"kind": "eval", "step": steps, "accuracy": 0.5})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_each_run_is_drawn_by_the_child_in_the_order_added(tmp_path, monkeypatch):
    first, second = finished_run(tmp_path / "sft", 5), finished_run(tmp_path / "rl", 40)

    def drawn_here(*args, **kwargs):
        raise AssertionError("plot_run ran in the demo's own process")
    # The parent's plot_run fails; the spawned child imports its own, unpatched.
    monkeypatch.setattr(plot, "plot_run", drawn_here)
    with run_plots.RunPlots() as plots:
        plots.add(first)
        plots.add(second)
        paths = plots.paths()
    assert paths == [str(first / "plots" / "train.png"), str(first / "plots" / "eval.png"),
                     str(second / "plots" / "train.png"), str(second / "plots" / "eval.png")]
    for path in paths:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_runs_the_child_never_drew_are_drawn_here(tmp_path):
    """The child killed (or never started: a script without a __main__ guard): the run it held
    and every run added after are drawn by `paths` in this process."""
    first, second = finished_run(tmp_path / "sft", 5), finished_run(tmp_path / "rl", 7)
    with run_plots.RunPlots() as plots:
        plots.add(first)
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)
            child.join()
        plots.add(second)
        paths = plots.paths()
    assert paths == [str(run / "plots" / name) for run in (first, second)
                     for name in ("train.png", "eval.png")]
    assert all(open(path, "rb").read(4) == b"\x89PNG" for path in paths)


def test_a_plot_error_is_raised_by_paths(tmp_path):
    run = finished_run(tmp_path / "rm", 3)
    (tmp_path / "elsewhere").mkdir()
    (run / "plots").symlink_to(tmp_path / "elsewhere")
    with run_plots.RunPlots() as plots:
        plots.add(run)
        with pytest.raises(UsageError, match="is a symbolic link"):
            plots.paths()
    assert not any((tmp_path / "elsewhere").iterdir())


def test_add_outside_the_block_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="outside its `with` block"):
        run_plots.RunPlots().add(tmp_path)
