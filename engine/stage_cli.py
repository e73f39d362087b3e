"""What `fusedrl sft` and `fusedrl rm` share: a YAML config plus `key=value` overrides.

    fusedrl sft --config sft.yaml optim.lr=2e-5 train.max_steps=100
Every option of the stage's config dataclass is listed in `--help`; unknown keys and wrong types
stop the command with a message naming the key before any model is loaded.
"""
from __future__ import annotations

import argparse

from engine import config_io
from engine.data import DataError

_USAGE_NOTE = """options (YAML keys; nested sections as dotted overrides, e.g. optim.lr=2e-5):
{options}

Values are YAML scalars: 1e-4, true, null, "a string". Overrides win over the file."""


def add_stage_parser(subparsers, name: str, config_cls, run_fn, summary: str) -> argparse.ArgumentParser:
    """Register subcommand `name` whose namespace carries run=... that builds `config_cls` and calls
    `run_fn(config) -> exported model directory`."""
    p = subparsers.add_parser(
        name, help=summary, description=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_USAGE_NOTE.format(options="\n".join(config_io.describe(config_cls))))
    p.add_argument("--config", help="YAML file with the options below")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="options overriding the file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.set_defaults(run=lambda args: run_stage(args, name, config_cls, run_fn))
    return p


def run_stage(args, name: str, config_cls, run_fn) -> int:
    try:
        config = config_io.load(config_cls, args.config, args.overrides)
    except (config_io.ConfigError, ValueError, OSError) as e:
        raise SystemExit(f"fusedrl {name}: {e}") from None
    if args.print_config:
        import yaml
        print(yaml.safe_dump(config_io.to_dict(config), sort_keys=False), end="")
        return 0
    try:
        out = run_fn(config)
    except (DataError, FileNotFoundError) as e:  # user input problems: a message, not a traceback
        raise SystemExit(f"fusedrl {name}: {e}") from None
    print(f"fusedrl {name}: model written to {out}")
    return 0
