"""Progress on stderr (a bar on a terminal, plain lines in a log file) and the trackers of
train.report_to: which are asked for, a missing package refused before anything is created, and the
real libraries' runs where they are installed."""
import io

import pytest

from cli_testing import cli_error
from fusedrl.engine.config import io as config_io
from fusedrl.engine.config.train import DataConfig, SFTConfig, TrainConfig
from fusedrl.engine.errors import UsageError
from fusedrl.engine.stages.sft import train_sft
from fusedrl.engine.train import progress
from fusedrl.engine.train.runlog import RunLog
from fusedrl.engine.train.trackers import TRACKERS, check_installed, scalars, tracker_names
from train_testing import demonstrations, write_jsonl


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_file_gets_plain_lines_at_most_one_per_interval_and_the_last():
    stream = io.StringIO()
    lines = progress.open_progress("run", 100, 0, stream)
    assert isinstance(lines, progress.Lines)
    for step in range(1, 101):
        lines.show("train", step, {"loss": 1.0 / step, "lr": 3e-4, "tokens": 5, "note": "text"})
    lines.show("eval", 100, {"loss": 0.5, "accuracy": 0.75})
    text = stream.getvalue()
    assert "\r" not in text
    first, last, evaluation = text.splitlines()  # the 30 s interval held back steps 2-99
    assert first.startswith("run train step 1/100 loss 1 lr 0.0003 | ") and "steps/s, eta" in first
    assert last.startswith("run train step 100/100 loss 0.01 lr 0.0003 | ")
    assert evaluation == "run eval step 100/100 loss 0.5 accuracy 0.75"


def test_a_log_line_every_logged_step_when_the_interval_allows_and_a_bar_on_a_terminal():
    stream = io.StringIO()
    lines = progress.Lines("run", 3, 1, stream, every_s=0)
    for step in (2, 3):
        lines.show("train", step, {"loss": 2.0})
    assert [line.split(" | ")[0] for line in stream.getvalue().splitlines()] == [
        "run train step 2/3 loss 2", "run train step 3/3 loss 2"]
    terminal = Terminal()
    bar = progress.open_progress("run", 3, 0, terminal)
    assert isinstance(bar, progress.Bar)
    bar.show("train", 3, {"loss": 2.0})
    bar.close()
    assert "3/3" in terminal.getvalue() and "t.loss=2" in terminal.getvalue()


def options(*overrides):
    """The `train` section of an SFT config with these overrides."""
    base = ["model=m", "output_dir=o", "data.train_file=d"]
    return config_io.load(SFTConfig, None, [*base, *overrides]).train


def test_report_to_names_the_trackers_and_train_tensorboard_is_one_of_them():
    assert tracker_names(options()) == [] and tracker_names(options("train.report_to=none")) == []
    assert options("train.report_to=wandb,mlflow").report_to == ["wandb", "mlflow"]
    both = options("train.report_to=[mlflow]", "train.tensorboard=true")
    assert tracker_names(both) == ["mlflow", "tensorboard"]
    assert TrainConfig(report_to="tensorboard").report_to == ["tensorboard"]  # a text from Python
    with pytest.raises(ValueError, match="train.report_to: 'comet' is not a tracker; expected "):
        options("train.report_to=comet")
    record = {"loss": 1.5, "flag": True, "rank_tokens": [1, 2], "nan": float("nan")}
    assert scalars("train", record) == {"train/loss": 1.5}


def missing_tracker():
    missing = [name for name in TRACKERS if not _installed(name)]
    if not missing:
        pytest.skip("every tracker's package is installed here")
    return missing[0]


def _installed(name):
    try:
        check_installed([name])
        return True
    except UsageError:
        return False


def test_a_missing_tracker_package_is_one_line_before_the_run_directory_exists(tmp_path, qwen2_dir,
                                                                               capsys):
    name = missing_tracker()
    data = write_jsonl(tmp_path / "train.jsonl", demonstrations(4))
    out = tmp_path / "run"
    argv = ["sft", f"model={qwen2_dir}", f"output_dir={out}", f"data.train_file={data}",
            f"train.report_to=tensorboard,{name}"]
    code, err = cli_error(argv, capsys)
    assert code == 2 and err == (
        f"fusedrl sft: train.report_to={name} needs the {name} package, which is not installed: "
        f"pip install 'fusedrl[{name}]' (or drop {name} from train.report_to)\n")
    assert not out.exists()


def test_the_python_api_refuses_a_missing_tracker_before_the_directory(tmp_path, qwen2_dir):
    name = missing_tracker()
    data = write_jsonl(tmp_path / "train.jsonl", demonstrations(4))
    cfg = SFTConfig(model=str(qwen2_dir), output_dir=str(tmp_path / "run"),
                    data=DataConfig(train_file=str(data)), train=TrainConfig(report_to=[name]))
    with pytest.raises(UsageError, match=f"needs the {name} package"):
        train_sft(cfg)
    assert not (tmp_path / "run").exists()


def two_records(run_dir, tracker):
    """A run log of two train records fed to `tracker`."""
    config = SFTConfig(model="/m", output_dir=str(run_dir), data=DataConfig(train_file="t"))
    run = RunLog(run_dir, config, 2, progress=False, trackers=[tracker])
    run.log("train", 1, {"loss": 2.0})
    run.log("train", 2, {"loss": 1.0})
    run.close()


def test_wandb_offline_gets_every_record(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    two_records(tmp_path, "wandb")
    assert wandb.run is None and list((tmp_path / "wandb").glob("offline-run-*"))


def test_mlflow_gets_the_params_and_every_record(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    two_records(tmp_path / "run", "mlflow")
    (found,) = mlflow.search_runs(output_format="list")
    assert found.data.params["optim.lr"] == "1e-05"
    history = mlflow.MlflowClient().get_metric_history(found.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]
