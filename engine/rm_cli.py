"""`fusedrl rm`: reward-model training from a YAML config (see engine/stage_cli.py)."""
from __future__ import annotations

from engine.stage_cli import add_stage_parser
from engine.train_config import RMConfig


def _run(config) -> str:
    from engine.rm import run_rm  # deferred: parsing and --help need no trainer
    return run_rm(config)


def add_parser(subparsers):
    return add_stage_parser(subparsers, "rm", RMConfig, _run,
                            "reward model on pairwise / K-way preferences (InstructGPT ranking loss)")
