"""The Python API: each training stage as one call, for programs that embed fusedrl
(docs/python_api.md).

    from fusedrl.engine import GRPOConfig, run_grpo
    result = run_grpo({"policy": "sft/final", "output_dir": "runs/grpo"}, reward_fn=[acc],
                      dataset=ds)
    result.final_dir, result.metrics

Each is a thin call of its trainer object (trainers.py: GRPOTrainer, ...), which also takes an
in-memory model and callbacks.

A config is a config object, a nested dict, or the path of a YAML file (as `fusedrl <stage>
--config` reads it), with optional `key=value` overrides. Data come from the config's files or a
`datasets.Dataset` passed as `dataset`. Errors are exceptions (engine/errors.py: FusedRLError,
UsageError for a wrong option or path, DataError for a bad row), never an exit of the process.
"""
from __future__ import annotations

from typing import Callable, Optional

from .config.ppo import GRPOConfig, PPOConfig
from .config.train import RMConfig, SFTConfig
from .trainers import (GRPOTrainer, PPOTrainer, RewardTrainer, SFTTrainer, TrainResult,
                       as_config)

__all__ = ["run_sft", "run_rm", "run_ppo", "run_grpo", "TrainResult", "as_config"]


def run_sft(config, dataset=None, eval_dataset=None, overrides: list[str] = ()) -> TrainResult:
    """Supervised fine-tuning per `config` (SFTConfig, dict or YAML path) on its data or `dataset`
    (a datasets.Dataset; eval_dataset: held-out rows)."""
    return SFTTrainer(args=as_config(SFTConfig, config, overrides), train_dataset=dataset,
                      eval_dataset=eval_dataset).train()


def run_rm(config, dataset=None, eval_dataset=None, overrides: list[str] = ()) -> TrainResult:
    """A reward model per `config` (RMConfig, dict or YAML path) on its data or `dataset`."""
    return RewardTrainer(args=as_config(RMConfig, config, overrides), train_dataset=dataset,
                         eval_dataset=eval_dataset).train()


def run_ppo(config, reward_fn: Optional[Callable] = None, dataset=None,
            overrides: list[str] = ()) -> TrainResult:
    """PPO per `config` (PPOConfig, dict or YAML path) on its prompts or `dataset`, scored by its
    reward model or `reward_fn` (callables instead of config's reward_fn)."""
    return PPOTrainer(reward_funcs=reward_fn, args=as_config(PPOConfig, config, overrides),
                      train_dataset=dataset).train()


def run_grpo(config, reward_fn: Optional[Callable] = None, dataset=None,
             overrides: list[str] = ()) -> TrainResult:
    """GRPO per `config` (GRPOConfig, dict or YAML path): run_ppo with GRPO's defaults."""
    return GRPOTrainer(reward_funcs=reward_fn, args=as_config(GRPOConfig, config, overrides),
                       train_dataset=dataset).train()
