"""Training configs: YAML + overrides, rejection of unknown keys and wrong types, the CLI surface."""
import importlib.resources

import pytest

from fusedrl.engine.errors import UsageError
import yaml

from fusedrl.engine.config import io as config_io
from fusedrl.engine.cli import build_parser

from fusedrl.engine.config.train import DataConfig, OptimConfig, RMConfig, SFTConfig

REQUIRED = ["model=/m", "output_dir=/o", "data.train_file=t.jsonl"]


def test_yaml_plus_overrides_build_nested_dataclasses(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: /m\noutput_dir: /o\ndata:\n  train_file: t.jsonl\n  max_length: 64\n"
                    "  max_prompt_length: 16\noptim:\n  lr: 1.0e-4\n")
    cfg = config_io.load(RMConfig, path, ["optim.lr=3e-4", "train.max_steps=5", "beta_rm=1", "data.eval_file=null"])
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 5 and cfg.data.max_length == 64
    assert cfg.beta_rm == 1.0 and isinstance(cfg.beta_rm, float) and cfg.data.eval_file is None
    # The resolved config round-trips through the dict (what the run directory stores).
    assert config_io.from_dict(RMConfig, config_io.to_dict(cfg)) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
    (["nope=1"], "unknown config key 'nope'"),
    (["optim.lr=fast"], r"optim.lr: expected float, got 'fast' \(str\)"),
    (["train.epochs=1.5"], "train.epochs: expected int, got 1.5"),
    (["train.epochs=true"], "train.epochs: expected int, got True"),
    (["train.resume=1"], "train.resume: expected bool, got 1"),
    (["optim=3"], "optim: expected a mapping"),
    (["optim.lr"], "not of the form key=value"),
    (["optim.lr=-1"], "optim.lr must be a finite number > 0"),
    (["optim.lr=.inf"], "optim.lr must be a finite number > 0, got inf"),
    (["data.max_prompt_length=2000"], "max_prompt_length must be in"),
    (["data.format=pairwise"], "data.format for sft must be one of"),
])
def test_bad_keys_and_types_are_rejected_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_io.load(SFTConfig, None, REQUIRED + overrides)


def test_required_fields_and_validation_from_python():
    with pytest.raises(ValueError, match="model is required"):
        SFTConfig(output_dir="/o", data=DataConfig(train_file="t")).require_model()
    with pytest.raises(ValueError, match="data.train_file is required"):
        SFTConfig(model="/m", output_dir="/o").require_data()
    with pytest.raises(ValueError, match="grad_accum_steps must be >= 1"):
        OptimConfig(grad_accum_steps=0)
    with pytest.raises(ValueError, match="tokens_per_batch"):
        DataConfig(train_file="t", max_length=100, max_prompt_length=50, tokens_per_batch=50)
    with pytest.raises(ValueError, match=r"data.tokens_per_microbatch \(99\) must be null or hold one sequence"):
        DataConfig(train_file="t", max_length=100, max_prompt_length=50, tokens_per_microbatch=99)


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["rm", "--help"])
    text = capsys.readouterr().out
    documented = {line.split()[0] for line in text.splitlines() if line.startswith("  ") and "): " in line}
    expected = {line.split()[0] for line in config_io.describe(RMConfig)}
    assert expected == documented and {"optim.lr", "beta_rm", "data.tokens_per_batch", "train.resume"} <= documented
    assert all(line.split("): ", 1)[1].strip() for line in config_io.describe(RMConfig))  # no empty help


def test_cli_rejects_unknown_keys_before_loading_anything(capsys):
    args = build_parser().parse_args(["sft", *REQUIRED, "optim.learning_rate=1"])
    with pytest.raises(UsageError, match="^unknown config key 'optim.learning_rate'"):
        args.run(args)


def test_cli_prints_the_resolved_config(tmp_path, capsys):
    path = tmp_path / "rm.yaml"
    path.write_text(yaml.safe_dump({"model": "/m", "output_dir": "/o", "data": {"train_file": "t"}}))
    args = build_parser().parse_args(["rm", "--config", str(path), "beta_rm=0.5", "--print-config"])
    assert args.run(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["beta_rm"] == 0.5 and printed["optim"]["lr"] == OptimConfig().lr


@pytest.mark.parametrize("cls, name", [(SFTConfig, "sft.yaml"), (RMConfig, "rm.yaml")])
def test_example_configs_load(cls, name):
    path = importlib.resources.files("fusedrl.engine.config") / "presets" / name  # shipped as package data
    cfg = config_io.load(cls, path, REQUIRED)
    assert cfg.optim.lr < 1e-4 and cfg.data.train_file == "t.jsonl"
