"""`fusedrl bench ...`: its arguments handed whole to fusedrl.bench.command, the command that sits
above the engine and the kernels. It is found by name when it runs: the engine imports nothing of
the benchmarks (which import the engine)."""
from __future__ import annotations

import argparse
import importlib

BENCH_COMMAND = "fusedrl.bench.command"


def add_bench_parser(commands, _add_debug_flag) -> None:
    """`fusedrl bench` on the `fusedrl` command's subparsers (its own parser: `fusedrl bench
    --help`; `--debug` is read from its arguments, so the flag adder the other commands take is
    not used)."""
    p = commands.add_parser("bench", add_help=False, prefix_chars="+",  # every option is its own
                            help="benchmark kernels, generation, training and RL against the "
                                 "peers and the device's limit (fusedrl bench --help)")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(run=run_bench)


def run_bench(args) -> int:
    args.debug = getattr(args, "debug", False) or "--debug" in args.argv
    command = importlib.import_module(BENCH_COMMAND)
    return command.main([a for a in args.argv if a != "--debug"])
