"""`fusedrl bench`: the command above the engine and the kernels (the `fusedrl` command hands it
its arguments whole; engine/cli/bench.py). Its parser, the run of the suites, and `compare`.

    fusedrl bench headline | kernels | generate | train | rl | all [--quick] [model=NAME|DIR]
                  [seed=N] [output_dir=DIR] [overwrite=true] [only=TEXT,...] [max_minutes=M]
                  [row_seconds=S] [interpret=true]
    fusedrl bench compare A B            (each a results.json or the run directory holding it)
    torchrun --nproc-per-node=N -m fusedrl.engine.cli bench train|rl ...   # per-GPU rows

output_dir=DIR: DIR/results.jsonl (a row a line, appended as measured), DIR/results.json (the
schema of results.py) and DIR/results.md, rewritten after every row; PNG charts at the end.
"""
from __future__ import annotations

import argparse
import os

from fusedrl.engine.errors import UsageError

from .options import PER_RANK_SUITES, SHAPE_NAMES, SUITE_HELP, SUITES, parse_options

OVERRIDES_HELP = (f"model=NAME|DIR (one of {', '.join(SHAPE_NAMES)}; default qwen2.5-0.5b), "
                  f"seed=N, output_dir=DIR, overwrite=true, only=TEXT[,TEXT...] (the cases whose "
                  f"name, 'suite: case', holds one, e.g. only=gae,grpo), max_minutes=M (the "
                  f"run's deadline), "
                  f"row_seconds=S (one case's budget for its timed repetitions), interpret=true (CPU: our Triton kernels "
                  f"in the interpreter instead of the PyTorch backend the engine runs there)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of `fusedrl bench ...`."""
    p = argparse.ArgumentParser(
        prog="fusedrl bench",
        description="Benchmark a suite on this machine's device (a GPU, else the CPU, labelled "
                    "so), each row beside the peers and as a fraction of the device's limit, "
                    "each row written the moment it is measured.")
    suites = p.add_subparsers(dest="suite", required=True)
    for name, summary in {**SUITE_HELP, "all": f"{', '.join(SUITES)}, in that order"}.items():
        s = suites.add_parser(name, help=summary, description=summary)
        s.add_argument("--quick", action="store_true",
                       help="small shapes (a tiny model of the same architecture, kernel shapes "
                            "that still show each claim): minutes on a CPU")
        s.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    c = suites.add_parser("compare", help="two results.json side by side, as ratios per row",
                          description="B / A for every figure of every row both files hold")
    c.add_argument("a", metavar="A", help="a results.json, or the run directory holding it")
    c.add_argument("b", metavar="B", help="the same, of the run set beside A")
    return p


def check_world(suites: list[str]) -> None:
    """UsageError naming the first suite that cannot run on every rank (WORLD_SIZE > 1 only:
    options.PER_RANK_SUITES run on every rank, the others in one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for suite in suites if world > 1 else []:
        if suite not in PER_RANK_SUITES:
            raise UsageError(f"fusedrl bench {suite} under torchrun (WORLD_SIZE={world}): "
                             f"expected one of {', '.join(PER_RANK_SUITES)} (the others "
                             f"run in one process, without torchrun)")


def run_suites(args) -> int:
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    check_world(suites)
    try:
        options = parse_options(args.overrides, args.quick)
    except ValueError as e:
        raise UsageError(str(e)) from None
    from .runner import run
    command = " ".join(["fusedrl bench", args.suite, *(["--quick"] if args.quick else []),
                        *args.overrides])
    run(suites, options, command)
    return 0


def run_compare(args) -> int:
    from .results import compare_table
    try:
        print(compare_table(args.a, args.b))
    except ValueError as e:
        raise UsageError(str(e)) from None
    return 0


def main(argv: list[str]) -> int:
    """`fusedrl bench ARGV`: its exit code (usage errors raise UsageError, for the `fusedrl`
    command's one-line report)."""
    args = build_parser().parse_args(argv)
    return run_compare(args) if args.suite == "compare" else run_suites(args)
