"""`fusedrl bench`: the parser and the options (torch-free; runner.py does the work).

    fusedrl bench kernels | generate | train | rl | all [--quick] [model=NAME|DIR] [seed=N]
                  [output_dir=DIR] [overwrite=true] [only=TEXT,...]
    fusedrl bench compare A.json B.json

output_dir=DIR writes DIR/results.json (the schema of results.py), DIR/results.md and PNG charts;
without it the table is printed only.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

SUITE_HELP = {
    "kernels": "every fused op against eager PyTorch, torch.compile and the installed peers "
               "(Liger, TRL 1.x's fused head): time, peak memory, bytes moved, fraction of "
               "the memory bandwidth",
    "generate": "decode at batch 1 and the mixed workload (256 requests, prompt and output "
                "lengths uniform in [100, 1024]): tok/s and fraction of the decode roofline",
    "train": "one training micro-batch (forward + backward) and optimizer step: tokens/s, MFU",
    "rl": "a GRPO and a PPO iteration per phase: tokens/s/GPU, weight-sync time, peak memory "
          "beside `fusedrl plan`'s prediction; TRL 1.x's GRPOTrainer where installed",
    "all": "kernels, generate, train and rl",
}
SHAPE_NAMES = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3.1-8b", "qwen3-30b-a3b")


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """The key=value options of a suite run."""
    model: str = "qwen2.5-0.5b"   # a named shape (shapes.py, random weights) or a local HF dir
    seed: int = 0
    output_dir: str | None = None
    overwrite: bool = False
    only: tuple[str, ...] = ()     # run the cases whose name holds one of these (all: empty)
    quick: bool = False

    def __post_init__(self):
        if self.model not in SHAPE_NAMES and self.model != "qwen3-0.6b" \
                and not os.path.isdir(self.model):
            raise ValueError(f"model={self.model}: expected one of {', '.join(SHAPE_NAMES)} or "
                             f"a local Hugging Face directory")
        if self.output_dir is not None:
            target = os.path.join(self.output_dir, "results.json")
            if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
                raise ValueError(f"output_dir={self.output_dir}: exists and is not a directory")
            if os.path.exists(target) and not self.overwrite:
                raise ValueError(f"output_dir={self.output_dir}: holds a results.json already "
                                 f"(overwrite=true replaces it)")


def parse_options(pairs: list[str], quick: bool) -> BenchOptions:
    """key=value strings -> BenchOptions; one-line ValueError naming a bad key or value."""
    fields = {f.name: f for f in dataclasses.fields(BenchOptions) if f.name != "quick"}
    values: dict = {"quick": quick}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"{pair!r}: expected key=value with key one of {', '.join(fields)}")
        if key == "seed":
            try:
                values[key] = int(value)
            except ValueError:
                raise ValueError(f"seed={value}: expected an integer") from None
        elif key == "only":
            values[key] = tuple(part for part in value.split(",") if part)
        elif key == "overwrite":
            if value.lower() not in ("true", "false"):
                raise ValueError(f"overwrite={value}: expected true or false")
            values[key] = value.lower() == "true"
        else:
            values[key] = value
    return BenchOptions(**values)


def add_bench_parser(commands, add_debug_flag) -> None:
    """`fusedrl bench ...` on the `fusedrl` command's subparsers."""
    p = commands.add_parser("bench", help="benchmark kernels, generation, training and RL "
                                          "against the peers and the device's limit",
                            description="Benchmark a suite on this machine's device (a GPU, "
                                        "else the CPU, labelled so), each row beside the peers "
                                        "and as a fraction of the device's limit. "
                                        "output_dir=DIR writes DIR/results.json, results.md "
                                        "and PNG charts.")
    add_debug_flag(p)
    suites = p.add_subparsers(dest="suite", required=True)
    for name, summary in SUITE_HELP.items():
        s = suites.add_parser(name, help=summary, description=summary)
        s.add_argument("--quick", action="store_true",
                       help="small shapes (a tiny model of the same architecture): minutes on a "
                            "CPU")
        s.add_argument("overrides", nargs="*", metavar="key=value",
                       help=f"model=NAME|DIR (one of {', '.join(SHAPE_NAMES)}; default "
                            f"qwen2.5-0.5b), seed=N, output_dir=DIR, overwrite=true, "
                            f"only=TEXT[,TEXT...] (the cases whose name holds one, e.g. "
                            f"only=gae,grpo)")
        add_debug_flag(s)
        s.set_defaults(run=run_suite)
    c = suites.add_parser("compare", help="two results.json side by side, as ratios per row",
                          description="B / A for every figure of every row both files hold")
    c.add_argument("a", metavar="A.json")
    c.add_argument("b", metavar="B.json")
    add_debug_flag(c)
    c.set_defaults(run=run_compare)


def run_suite(args) -> int:
    from fusedrl.engine.errors import UsageError
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # timed loops repeat until a time budget is spent: a count per rank
        raise UsageError(f"WORLD_SIZE={world}: fusedrl bench runs in one process on one "
                         f"device (its timed loops would issue unmatched collectives across "
                         f"ranks); run it without torchrun")
    try:
        options = parse_options(args.overrides, args.quick)
    except ValueError as e:
        raise UsageError(str(e)) from None
    from .runner import run
    command = " ".join(["fusedrl bench", args.suite, *(["--quick"] if args.quick else []),
                        *args.overrides])
    run(["kernels", "generate", "train", "rl"] if args.suite == "all" else [args.suite], options,
        command)
    return 0


def run_compare(args) -> int:
    from fusedrl.engine.errors import UsageError
    from .results import compare_table
    try:
        print(compare_table(args.a, args.b))
    except ValueError as e:
        raise UsageError(str(e)) from None
    return 0
