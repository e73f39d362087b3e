"""Run directory: metrics JSONL, TensorBoard events, progress bar, and `fusedrl plot`."""
import json

import pytest

from cli_testing import cli_error

from fusedrl.engine.cli import main
from fusedrl.engine.train.plot import curves
from fusedrl.engine.train.runlog import RunLog, read_metrics
from fusedrl.engine.config.train import DataConfig, SFTConfig


def config(tmp_path):
    return SFTConfig(model="/m", output_dir=str(tmp_path), data=DataConfig(train_file="t.jsonl"))


def write_run(tmp_path, **kw):
    run = RunLog(tmp_path, config(tmp_path), total_steps=3, **kw)
    for step in (1, 2, 3):
        run.log("train", step, {"loss": 3.0 / step, "lr": 1e-3, "grad_norm": 1.0, "note": "text"})
    run.log("eval", 3, {"loss": 1.5, "accuracy": 0.75})
    run.close()


def test_metrics_are_appended_as_json_lines_and_read_back(tmp_path, capsys):
    write_run(tmp_path, progress=True)
    (tmp_path / "metrics.jsonl").open("a").write('{"kind": "train", "ste')  # torn by a crash
    rows = read_metrics(tmp_path)
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    assert rows[-1]["accuracy"] == 0.75 and "time" in rows[0]
    assert "3/3" in capsys.readouterr().err  # the progress bar reached the last step
    assert (tmp_path / "config.yaml").read_text().startswith("model: /m")


def test_a_line_torn_inside_a_character_or_not_utf8_is_dropped_not_a_crash(tmp_path):
    write_run(tmp_path, progress=False)
    path = tmp_path / "metrics.jsonl"
    good = path.read_bytes()
    with path.open("ab") as f:  # a line that is not UTF-8, then one torn inside "é" (2 bytes)
        f.write(b'{"kind": "info", "step": 3, "note": "\xff\xfe"}\n')
        f.write('{"kind": "train", "step": 4, "note": "é"}\n'.encode()[:-4])
    assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path)] == [
        ("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    # A resume at step 3 keeps one series: every record up to it, none of the broken lines.
    RunLog(tmp_path, config(tmp_path), total_steps=4, first_step=3, progress=False).close()
    assert path.read_bytes() == good
    # A resume at step 2 drops the later records; malformed lines (no step, a step that is not a
    # number, not an object) go with them.
    with path.open("a") as f:
        f.write('[1]\n{"kind": "train", "loss": 1}\n{"kind": "train", "step": "2"}\n{"kind": "train", "step": null}\n')
    RunLog(tmp_path, config(tmp_path), total_steps=4, first_step=2, progress=False).close()
    assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path)] == [("train", 1), ("train", 2)]


def test_curves_keep_numeric_metrics_only():
    rows = [{"kind": "train", "step": 1, "time": 5.0, "loss": 2.0, "flag": True, "note": "x", "peak": None},
            {"kind": "train", "step": 2, "time": 6.0, "loss": float("nan")}, {"kind": "eval", "step": 2, "loss": 1.0}]
    assert curves(rows, "train") == {"loss": ([1], [2.0])}


def test_fusedrl_plot_writes_png_curves(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # an install extra; the GPU image may lack it
    write_run(tmp_path, progress=False)
    assert main(["plot", str(tmp_path)]) == 0
    for name in ("train.png", "eval.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.split() == [str(tmp_path / "plots" / n) for n in ("train.png", "eval.png")]


def test_fusedrl_plot_skips_records_it_cannot_place(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    lines = [b'{"kind": "train", "step": 1, "loss": 2.0}', b"[1]", b'{"kind": "train", "loss": 1}',
             b'{"kind": "train", "step": "x", "loss": 1}', b'"text"', b'{"kind": "train", "step": 2, "loss": 1.5}',
             '{"kind": "train", "step": 3, "note": "é'.encode()[:-1]]  # torn inside "é"
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines))
    assert main(["plot", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "plots" / "train.png")]
    rows = [[1], {"kind": "train", "loss": 1.0}, {"kind": "train", "step": True, "loss": 1.0},
            {"kind": "train", "step": 2, "loss": 1.5}]
    assert curves(rows, "train") == {"loss": ([2], [1.5])}


def test_plot_of_a_directory_without_metrics_fails_clearly(tmp_path, capsys):
    code, err = cli_error(["plot", str(tmp_path)], capsys)
    assert code == 2 and err == f"fusedrl plot: no metrics.jsonl in {tmp_path}: not a fusedrl run directory\n"


def test_tensorboard_events_are_written_when_asked(tmp_path):
    pytest.importorskip("tensorboard")
    write_run(tmp_path, progress=False, trackers=["tensorboard"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([3.0, 1.5, 1.0])
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 3.0
