"""What the one loop and the one checkpointer guarantee: a non-finite step is skipped and counted, a
run of them stops the run, nothing non-finite reaches the disk, checkpoints are verified (a corrupt
newest one falls back to the previous), leftovers of killed writes go, exports are readable by
others, saves happen on a clock, and metrics.jsonl stays one series."""
import json
import os
import stat

import pytest
import torch

from fusedrl.engine.errors import NonFiniteError
from fusedrl.engine.model.hf_io import load_model, save_model
from fusedrl.engine.stages import rm as rm_stage
from fusedrl.engine.stages.rm import train_rm
from fusedrl.engine.stages.sft import train_sft, sft_stage
from fusedrl.engine.train import loop, supervised
from fusedrl.engine.train.checkpoint import read_tensors
from fusedrl.engine.train.loop import Diverged, SaveClock
from fusedrl.engine.train.runlog import keep_series, metrics_line, read_metrics
from train_testing import demonstrations, rm_config, save_tiny_model, sft_config, sorted_digit_preferences, write_jsonl


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("base"), "qwen2")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", demonstrations(24))


def poison_steps(monkeypatch, steps):
    """Make the SFT loss NaN on the given optimizer steps (1-based), as a diverging run would."""
    stage, calls = supervised.Stage, {"n": 0}

    def nan_stage(*args, **kw):
        built = sft_stage(*args, **kw)
        base = built.loss

        def loss(model, batch, counts):
            calls["n"] += model.training  # eval forwards do not count
            value, stats = base(model, batch, counts)
            if model.training and calls["n"] in steps:
                return value * float("nan"), {**stats, "nll_sum": float("nan")}
            return value, stats
        return stage(**{**vars(built), "loss": loss})
    monkeypatch.setattr("fusedrl.engine.stages.sft.sft_stage", nan_stage)


def all_finite(directory):
    from safetensors.torch import load_file
    files = list(directory.rglob("*.safetensors"))
    assert files
    return all(torch.isfinite(t).all() for f in files for t in load_file(f).values())


def test_a_non_finite_step_is_skipped_counted_and_announced(base_dir, train_file, tmp_path, monkeypatch, capsys):
    poison_steps(monkeypatch, {2})
    train_sft(sft_config(base_dir, train_file, tmp_path, data={"eval_fraction": 0.0},
                         train={"max_steps": 3, "save_every": 1, "keep_checkpoints": 0}))
    train = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [r["skipped_steps"] for r in train] == [0, 1, 1]
    assert "step 2: no update (non-finite loss or gradient" in capsys.readouterr().err
    ckpt = tmp_path / "checkpoints"
    one, two = (read_tensors(ckpt / f"step-0000000{i}", "models.model.") for i in (1, 2))
    assert all(torch.equal(one[k], two[k]) for k in one)  # the skipped step changed nothing
    assert all_finite(tmp_path)


def test_consecutive_skips_stop_the_run_and_nothing_is_exported(base_dir, train_file, tmp_path, monkeypatch):
    poison_steps(monkeypatch, set(range(2, 100)))
    cfg = sft_config(base_dir, train_file, tmp_path, data={"eval_fraction": 0.0},
                     train={"max_steps": 8, "max_consecutive_skips": 3})
    with pytest.raises(Diverged, match=r"stopped at step 4: 3 steps in a row could not update .*lower optim.lr"):
        train_sft(cfg)
    assert not (tmp_path / "final").exists()


def test_lr_that_is_not_finite_is_a_config_error():
    from fusedrl.engine.config.train import OptimConfig
    with pytest.raises(ValueError, match="optim.lr must be a finite number > 0, got inf"):
        OptimConfig(lr=float("inf"))


def test_a_model_with_nan_is_never_written(base_dir, tmp_path):
    model = load_model(base_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"'model.layers.1.mlp.down_proj.weight' holds NaN or inf"):
        save_model(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # not even a temp dir


def test_rm_with_a_non_finite_reward_offset_fails_without_exporting(base_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "pairs.jsonl", sorted_digit_preferences(8))
    monkeypatch.setattr(rm_stage, "mean_raw_reward", lambda *a, **k: float("nan"))
    with pytest.raises(NonFiniteError, match="reward_offset"):
        train_rm(rm_config(base_dir, data, tmp_path / "run", train={"max_steps": 1}))
    assert not (tmp_path / "run" / "final").exists()


def test_corrupt_newest_checkpoint_falls_back_leftovers_go_and_exports_are_readable(
        base_dir, train_file, tmp_path, capsys):
    old_umask = os.umask(0o022)
    try:
        kw = dict(data={"eval_fraction": 0.0})
        train_sft(sft_config(base_dir, train_file, tmp_path, train={"max_steps": 2, "save_every": 1,
                                                                     "keep_checkpoints": 0}, **kw))
    finally:
        os.umask(old_umask)
    final = tmp_path / "final"
    assert stat.S_IMODE(final.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in final.iterdir()} == {0o644}
    ckpt = tmp_path / "checkpoints"
    weights = ckpt / "step-00000002" / "rank-00000.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte: same size, still loadable, wrong
    weights.write_bytes(bytes(data))
    leftovers = [ckpt / ".step-00000003.tmp-x1", tmp_path / ".final.tmp-x2", tmp_path / ".final.old-x3"]
    for path in leftovers:
        path.mkdir()
    train_sft(sft_config(base_dir, train_file, tmp_path, train={"max_steps": 3}, **kw))
    assert "checkpoint step-00000002 is corrupt" in capsys.readouterr().err
    info = [r for r in read_metrics(tmp_path) if r["kind"] == "info" and "resumed_from" in r][-1]
    assert info["resumed_from"].endswith("step-00000001") and info["removed_leftovers"] == 3
    assert not any(p.exists() for p in leftovers)
    assert (ckpt / "corrupt-step-00000002").is_dir()
    steps = [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert steps == [1, 2, 3]  # one series: the records past the resumed step were dropped


def test_save_clock_saves_every_so_many_minutes(monkeypatch):
    now = {"t": 1000.0}
    monkeypatch.setattr(loop.time, "monotonic", lambda: now["t"])
    clock = SaveClock(every=0, minutes=10, last=100)
    assert not clock.due(1)
    now["t"] += 599
    assert not clock.due(2)
    now["t"] += 2
    assert clock.due(3)
    clock.saved()
    assert not clock.due(4) and clock.due(100)


def test_keep_series_drops_records_past_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(metrics_line("train", s, {}) for s in (1, 2, 3, 4)) + '{"kind": "tr')
    keep_series(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    keep_series(path, 0)
    assert path.read_text() == ""
