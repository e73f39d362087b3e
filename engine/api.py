"""The Python API: each training stage as one call, for programs that embed fusedrl
(docs/python_api.md).

    from fusedrl.engine import GRPOConfig, run_grpo
    result = run_grpo({"policy": "sft/final", "output_dir": "runs/grpo"}, reward_fn=[acc],
                      dataset=ds)
    result.final_dir, result.metrics

A config is a config object, a nested dict, or the path of a YAML file (as `fusedrl <stage>
--config` reads it), with optional `key=value` overrides. Data come from the config's files or a
`datasets.Dataset` passed as `dataset`. Errors are exceptions (engine/errors.py: FusedRLError,
UsageError for a wrong option or path, DataError for a bad row), never an exit of the process.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .config.io import ConfigError, to_dict
from .config.ppo import GRPOConfig, PPOConfig
from .config.train import RMConfig, SFTConfig
from .errors import RunComplete, UsageError
from .runs.path_checks import check_input_file


@dataclass
class TrainResult:
    """What a finished stage returns."""

    final_dir: Path    # the exported model (RUN_DIR/final): transformers-loadable
    output_dir: Path   # the run directory: config.yaml, metrics.jsonl, checkpoints
    metrics: dict      # the last "train" record of metrics.jsonl (step, loss or score, ...)


def as_config(cls, config, overrides: list[str] = ()):
    """`config` as a `cls`: an instance of it (overrides applied on its values), a nested dict, or
    the path of a YAML file; a ConfigError (a ValueError) naming the bad key otherwise."""
    if isinstance(config, cls):
        return cls.from_dict(to_dict(config), overrides) if overrides else config
    if isinstance(config, dict):
        return cls.from_dict(config, overrides)
    if isinstance(config, (str, Path)):
        return cls.from_yaml(config, overrides)
    raise ConfigError(f"config: expected a {cls.__name__}, a dict or a YAML file path, got "
                      f"{type(config).__name__}")


def _ready(config, dataset) -> None:
    """The config names its data unless a dataset is given, and every data file it names is there
    (checked as given, before the run makes its paths absolute: a hub name is said as one)."""
    if dataset is None:
        try:
            config.require_data()
        except ValueError as e:
            raise UsageError(f"{e}, or pass dataset=") from None
    for option, path in config.paths()[1].items():
        if path:
            check_input_file(path, option)


def _trained(train: Callable, *args, **kwargs) -> Path:
    """The final model's directory of `train(*args, **kwargs)`, a stage's entry point; a run found
    complete (engine/train/loop.py: nothing was changed) gives the one it wrote before."""
    try:
        return train(*args, **kwargs)
    except RunComplete as done:
        return done.final


def _result(final_dir, output_dir) -> TrainResult:
    from .train.runlog import read_metrics
    records = [r for r in read_metrics(output_dir) if r.get("kind") == "train"]
    return TrainResult(Path(final_dir), Path(output_dir), records[-1] if records else {})


def run_sft(config, dataset=None, eval_dataset=None, overrides: list[str] = ()) -> TrainResult:
    """Supervised fine-tuning per `config` (SFTConfig, dict or YAML path) on its data or `dataset`
    (a datasets.Dataset; eval_dataset: held-out rows)."""
    from .stages.sft import run_sft as train
    cfg = as_config(SFTConfig, config, overrides)
    _ready(cfg, dataset)
    return _result(_trained(train, cfg, dataset, eval_dataset), cfg.output_dir)


def run_rm(config, dataset=None, eval_dataset=None, overrides: list[str] = ()) -> TrainResult:
    """A reward model per `config` (RMConfig, dict or YAML path) on its data or `dataset`."""
    from .stages.rm import run_rm as train
    cfg = as_config(RMConfig, config, overrides)
    _ready(cfg, dataset)
    return _result(_trained(train, cfg, dataset, eval_dataset), cfg.output_dir)


def run_ppo(config, reward_fn: Optional[Callable] = None, dataset=None,
            overrides: list[str] = ()) -> TrainResult:
    """PPO per `config` (PPOConfig, dict or YAML path) on its prompts or `dataset`, scored by its
    reward model or `reward_fn` (callables instead of config's reward_fn)."""
    return _run_rl(PPOConfig, config, reward_fn, dataset, overrides)


def run_grpo(config, reward_fn: Optional[Callable] = None, dataset=None,
             overrides: list[str] = ()) -> TrainResult:
    """GRPO per `config` (GRPOConfig, dict or YAML path): run_ppo with GRPO's defaults."""
    return _run_rl(GRPOConfig, config, reward_fn, dataset, overrides)


def _run_rl(cls, config, reward_fn, dataset, overrides) -> TrainResult:
    from .stages.ppo.trainer import run_ppo as train
    cfg = as_config(cls, config, overrides)
    _ready(cfg, dataset)
    return _result(_trained(train, cfg, reward_fn=reward_fn, dataset=dataset), cfg.output_dir)
