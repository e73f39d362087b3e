"""The `fusedrl` command: parsing and dispatch of every subcommand (info and demo here; the
training stages and plan in stages.py, plot and export in run_outputs.py, generate in generate.py).

    fusedrl info | demo | generate | sft | rm | ppo | grpo | distill | plan | export | plot | bench
    (`fusedrl <command> --help`)

Parsing needs only the torch-free config package: `fusedrl --help`, `fusedrl <stage> --help`, config
errors and wrong paths (engine/runs/path_checks.py) import neither torch nor transformers. Each
command's work is imported when it runs, after its arguments and paths are checked.
sft, rm, ppo, grpo and distill read a YAML config plus `key=value` overrides, set on the command's
own defaults (engine/config/io.py); every option of the stage's config dataclass is listed in its
`--help`, `--print-config` prints them resolved, and unknown keys, wrong types or impossible values
stop the command with a message naming the key (did-you-mean included) before any model is loaded.

Errors: every command ends a user mistake with one line `fusedrl <command>: <message>` on stderr,
exit 2 for usage errors (options, arguments, paths) and 1 for failures (engine/errors.py); `--debug`
(or FUSEDRL_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from .. import errors
from ..config import io as config_io
from ..config.demo import DemoConfig
from ..runs import path_checks, run_dir
from ...bench.command import add_bench_parser
from . import process
from .flags import add_debug_flag, add_quiet_flag
from .generate import add_generate_parser
from .run_outputs import add_export_parser, add_plot_parser
from .stages import STAGES, add_plan_parser, add_stage_parser

# --- info -------------------------------------------------------------------------------------

def run_info(_args) -> int:
    """Print versions, devices and which kernel backend each device would use."""
    import torch

    from ... import kernels

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(
        f"torch {torch.__version__}, triton {triton_version}, CUDA available: "
        f"{torch.cuda.is_available()}")
    print(f"requested backend: {kernels.requested_backend()} "
          f"(TRITON_INTERPRET={int(kernels.triton_interpreting())})")
    print(f"CPU: {torch.get_num_threads()} torch threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"  {device}: ops run on '{kernels.backend_for(torch.empty(0, device=device))}'")
    return 0


# --- demo -------------------------------------------------------------------------------------

def run_demo(args) -> int:
    cfg = config_io.command_config(DemoConfig, None, args.overrides)
    if args.print_config:
        return config_io.print_config(cfg)
    # before the demo imports torch
    run_dir.check_target(cfg.output_dir, "demo", overwrite=cfg.overwrite)
    path_checks.check_output_dir(cfg.output_dir)
    if cfg.task == "tool":
        from ..demos.tool import format_tool_table as format_table, run_tool_demo as demo
    elif cfg.task == "distill":
        from ..demos.distill import format_distill_table as format_table, run_distill_demo as demo
    else:
        from ..demos.sorting import format_table, run_demo as demo
    table = demo(cfg, quiet=args.quiet)
    print(format_table(table))
    print(f"results: {cfg.output_dir}/results.json, curves: {', '.join(table['plots'])}")
    return 0


def add_demo_parser(commands) -> None:
    p = commands.add_parser(
        "demo", help="the whole RLHF recipe on a program-checkable task, no downloads",
        description="SFT -> reward model -> PPO (or algo=grpo: SFT -> GRPO with the program's "
                    "reward) on a digit-sorting task, from nothing; task=tool: SFT -> multi-turn "
                    "GRPO of a model learning to call an add tool; task=distill: a sorting teacher "
                    "distilled on-policy into a smaller student, beside GRPO",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=lambda: "options (key=value):\n" + "\n".join(config_io.describe(DemoConfig)))
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="options, e.g. seed=1 output_dir=runs/demo")
    add_quiet_flag(p)
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved options as YAML and exit")
    add_debug_flag(p)
    p.set_defaults(run=run_demo)


# --- the command ------------------------------------------------------------------------------

class CommandParser(argparse.ArgumentParser):
    """A command's parser whose epilog may be given as a function, called when the epilog is read
    (its --help): listing every option and refused pair builds each config class, which every
    `fusedrl` process and torchrun rank would otherwise pay at start for a help it never prints.
    Its errors are one line, as every other mistake of the command."""

    def error(self, message: str):
        """Exit 2 with `fusedrl <command>: <message>` (argparse's own prints the usage first)."""
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")

    @property
    def epilog(self) -> str | None:
        return self._epilog() if callable(self._epilog) else self._epilog

    @epilog.setter
    def epilog(self, value) -> None:
        self._epilog = value


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="fusedrl", description="Kernel-optimized single-node RLHF.")
    add_debug_flag(parser)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    add_debug_flag(commands.add_parser("info", help="versions, devices and kernel backends"))
    commands.choices["info"].set_defaults(run=run_info)
    add_demo_parser(commands)
    add_generate_parser(commands, add_debug_flag)
    for name in STAGES:
        add_stage_parser(commands, name)
    add_plan_parser(commands)
    add_export_parser(commands)
    add_plot_parser(commands)
    add_bench_parser(commands, add_debug_flag)
    for command_parser in commands.choices.values():  # for the errors found after parsing
        command_parser.set_defaults(command_parser=command_parser)
    return parser


_OVERRIDE = re.compile(r"[A-Za-z_][\w.-]*=")


def dashed_as_overrides(argv: list[str], unknown: set[str]) -> list[str]:
    """`argv` with each option of `unknown` (`--key value`, `--key=value`, or a bare `--flag`, as
    transformers' and TRL's scripts take them) as the override `key=value` (`flag=true`); dashes in
    the key become underscores (`--learning-rate` -> learning_rate). A bare flag's next argument is
    its value unless it is an option or an override itself."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token in unknown:
            key, sep, value = token[2:].partition("=")
            following = argv[i + 1] if i + 1 < len(argv) else None
            if not sep and following is not None and not following.startswith("--") \
                    and not _OVERRIDE.match(following):
                value, i = following, i + 1
            elif not sep:
                value = "true"
            token = f"{key.replace('-', '_')}={value}"
        out.append(token)
        i += 1
    return out


def quiet_libraries(quiet: bool) -> None:
    """transformers', datasets' and the hub client's own output: no progress bars where stderr is
    not a terminal (a log file would get their `\r` redraws) or with --quiet; with --quiet none of
    their warnings and notes either. Through the environment variables they read when imported
    (later, in the command's work), or their own switches when they already are."""
    if quiet or not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if quiet:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
        if "transformers" in sys.modules:
            import transformers
            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (argparse exits 2 itself on a bad command line).
    Without `argv` this process is the command (sys.argv): the CPU defaults are set first
    (process.py)."""
    if argv is None:
        process.set_cpu_defaults()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    unknown = {x for x in extra if x.startswith("--")}
    if unknown and hasattr(args, "overrides"):  # `--learning_rate 1e-4` (TRL's form): key=value
        args, extra = parser.parse_known_args(dashed_as_overrides(argv, unknown))
    # key=value overrides after an option (`fusedrl plan ppo --gpus 8 lora.rank=64`): argparse
    # leaves them over.
    if (extra
        and not (hasattr(args, "overrides")
                 and all("=" in x and not x.startswith("-") for x in extra))):
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = getattr(args, "overrides", []) + extra
    quiet_libraries(getattr(args, "quiet", False))
    try:
        with process.interruptible():
            return _leave(args.run(args))
    except KeyboardInterrupt:
        if errors.debug_enabled(getattr(args, "debug", False)):
            raise
        print(f"fusedrl {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every error reaches the user as one line, unless debugging
        if errors.debug_enabled(getattr(args, "debug", False)):
            raise
        code, message = errors.one_line(e)
        if errors.should_print(e):
            print(f"fusedrl {args.command}: {message}", file=sys.stderr)
        elif not isinstance(e, (errors.Interrupted, errors.RunComplete)):
            errors.let_rank_0_speak()
        if isinstance(e, (errors.Interrupted, errors.RunComplete)):  # every rank ended here too
            return _leave(code)
        return code


def _leave(code: int) -> int:
    """`code`, after a torchrun rank left its process group (distributed.leave; it exits there)."""
    if "fusedrl.engine.parallel.distributed" in sys.modules:  # only the commands that need torch
        sys.modules["fusedrl.engine.parallel.distributed"].leave(code)
    return code
