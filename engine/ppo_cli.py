"""`fusedrl ppo`: PPO against a reward model or function, from a YAML config (see engine/stage_cli.py)."""
from __future__ import annotations

from engine.ppo_config import PPOConfig
from engine.stage_cli import add_stage_parser


def _run(config) -> str:
    from engine.ppo import KLCeilingExceeded, run_ppo  # deferred: parsing and --help need no trainer
    try:
        return run_ppo(config)
    except KLCeilingExceeded as e:
        raise SystemExit(f"fusedrl ppo: {e}") from None


def add_parser(subparsers):
    return add_stage_parser(subparsers, "ppo", PPOConfig, _run,
                            "PPO of the SFT policy against a reward model (InstructGPT step 3)")
