"""`fusedrl sft`: supervised fine-tuning from a YAML config (see engine/stage_cli.py)."""
from __future__ import annotations

from engine.stage_cli import add_stage_parser
from engine.train_config import SFTConfig


def _run(config) -> str:
    from engine.sft import run_sft  # deferred: parsing and --help need no trainer
    return run_sft(config)


def add_parser(subparsers):
    return add_stage_parser(subparsers, "sft", SFTConfig, _run,
                            "supervised fine-tuning on demonstrations (loss on response tokens)")
