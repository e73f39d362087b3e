"""`fusedrl demo`: SFT -> reward model -> PPO on a sorting task, from nothing (engine/demo.py)."""
from __future__ import annotations

import argparse

from engine import config_io
from engine.demo import DemoConfig


def add_parser(subparsers):
    p = subparsers.add_parser(
        "demo", help="the whole RLHF recipe on a program-checkable task, no downloads",
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="options (key=value):\n" + "\n".join(config_io.describe(DemoConfig)))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="options, e.g. seed=1 output_dir=runs/demo")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    try:
        cfg = config_io.load(DemoConfig, None, args.overrides)
    except (config_io.ConfigError, ValueError) as e:
        raise SystemExit(f"fusedrl demo: {e}") from None
    from engine.demo import format_table, run_demo  # deferred: --help needs no torch work
    table = run_demo(cfg, quiet=args.quiet)
    print(format_table(table))
    print(f"results: {cfg.output_dir}/results.json, curves: {', '.join(table['plots'])}")
    return 0
