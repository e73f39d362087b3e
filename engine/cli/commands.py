"""The `fusedrl` command: parsing and dispatch of every subcommand.

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
import json
import os
import re
import sys

from .. import errors
from ..config import io as config_io
from ..config.compatibility import table_lines
from ..config.demo import DemoConfig
from ..config.distill import DistillConfig
from ..config.ppo import GRPOConfig, PPOConfig
from ..config.train import RMConfig, SFTConfig
from ..runs import path_checks, run_dir, run_paths
from ..train import trackers
from ...bench.command import add_bench_parser
from . import process
from .generate import add_generate_parser

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


# --- sft / rm / ppo ----------------------------------------------------------------------------

REFUSED_EPILOG = """

options refused together, in one line before any model loads (engine/config/compatibility.py):
{pairs}"""


def _train_sft(config):
    from ..stages.sft import train_sft
    return train_sft(config)


def _train_rm(config):
    from ..stages.rm import train_rm
    return train_rm(config)


def _train_ppo(config):
    from ..stages.ppo.trainer import train_ppo
    return train_ppo(config)


def _train_distill(config):
    from ..stages.distill.trainer import train_distill
    return train_distill(config)


STAGES = {
    "sft": (SFTConfig, _train_sft,
            "supervised fine-tuning on demonstrations (loss on response tokens)"),
    "rm": (RMConfig, _train_rm, "reward model on pairwise or K-way rankings"),
    "ppo": (PPOConfig, _train_ppo,
            "PPO of the SFT policy against a reward model (InstructGPT step 3)"),
    "grpo": (GRPOConfig, _train_ppo,
             "critic-free RL (GRPO, Dr. GRPO, RLOO, REINFORCE++ baseline) against a "
             "reward function or model"),
    "distill": (DistillConfig, _train_distill,
                "on-policy distillation: the student (policy) samples, a frozen teacher=DIR of the "
                "same vocabulary scores every token, the student minimizes the divergence"),
}


def add_stage_parser(commands, name: str) -> None:
    config_cls, _, summary = STAGES[name]
    p = commands.add_parser(name, help=summary, description=summary,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=lambda: config_io.options_epilog(config_cls)
                            + REFUSED_EPILOG.format(pairs="\n".join(table_lines(config_cls))))
    p.add_argument("--config", help="YAML file with the options below")
    add_debug_flag(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="options overriding the file")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit")
    add_quiet_flag(p)
    p.set_defaults(run=lambda args: run_stage(args, name))


def add_quiet_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress on stderr (train.progress=false), and no warnings, notes "
                             "or progress bars of transformers and datasets themselves (errors "
                             "stay)")


# --print-config shows a config before it is run: output_dir, which only a run needs, may be left
# out. This stands in for it while the config is built, and is printed as the empty default.
_UNSET_OUTPUT_DIR = "(not given)"


def print_stage_config(config_cls, path, overrides: list[str]) -> int:
    """--print-config of a training stage: its config resolved as a run resolves it, output_dir
    not required (printed empty when left out)."""
    config = config_io.command_config(config_cls, path, overrides,
                                      fill={"output_dir": _UNSET_OUTPUT_DIR})
    if config.output_dir == _UNSET_OUTPUT_DIR:
        config.output_dir = ""
    return config_io.print_config(config)


def run_stage(args, name: str) -> int:
    config_cls, train, _ = STAGES[name]
    quiet = ["train.progress=false"] if args.quiet else []
    if args.print_config:
        return print_stage_config(config_cls, args.config, args.overrides + quiet)
    config = config_io.command_config(config_cls, args.config, args.overrides + quiet)
    trackers.check_installed(trackers.tracker_names(config.train))  # before anything is created
    try:
        config.require_model()
        config.require_data()
    except ValueError as e:
        raise errors.UsageError(str(e)) from None
    models, files = config.paths()
    path_checks.check_paths(models, files, config.output_dir)  # before the stage imports torch
    run_dir.check_target(config.output_dir, name, overwrite=config.train.overwrite,
                         resume=config.train.resume,
                         inputs=run_paths.run_inputs(config, args.config),
                         overwrite_option="train.overwrite=true", resume_option="train.resume=true")
    out = train(config)
    print(f"fusedrl {name}: model written to {out}")
    return 0


# --- plan -------------------------------------------------------------------------------------

def add_plan_parser(commands) -> None:
    p = commands.add_parser("plan",
                            help="per-GPU memory of a training stage in each phase, before launch",
                            description="per-GPU bytes of a stage's load, rollout, scoring, update "
                                        "and export (weights, grads, optimizer, KV pool, gathered "
                                        "weights, activations), whether it fits and what to change "
                                        "if not; needs only config.json")
    p.add_argument("stage", choices=list(STAGES))
    p.add_argument("--config", help="the stage's YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="the stage's options (`fusedrl STAGE --help`)")
    p.add_argument("--gpus", type=int, default=1,
                   help="GPUs of the run (torchrun --nnodes x --nproc-per-node)")
    p.add_argument("--gpus-per-node", type=int,
                   help="GPUs of a node (default --gpus): data_parallel=hybrid's shards")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB or 79.6GiB")
    p.add_argument("--json", action="store_true", help="print one JSON object (with `fits`)")
    add_debug_flag(p)
    p.set_defaults(run=_plan)


def _plan(args) -> int:
    from ..plan.command import run_plan
    return run_plan(args.stage, STAGES[args.stage][0], args)


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
    elif cfg.task == "vision":
        from ..demos.vision import format_vision_table as format_table, run_vision_demo as demo
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


# --- plot -------------------------------------------------------------------------------------

def add_plot_parser(commands) -> None:
    p = commands.add_parser("plot", help="plot a run's metrics as PNG curves",
                            description="PNG curves of a run's metrics.jsonl (one file per record "
                                        "kind)")
    p.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/plots)")
    add_debug_flag(p)
    p.set_defaults(run=run_plot)


def run_plot(args) -> int:
    path_checks.check_run_dir(args.run_dir)  # before importing matplotlib and torch
    from ..train.plot import plot_run
    try:
        written = plot_run(args.run_dir, args.out)
    except FileNotFoundError as e:
        raise errors.UsageError(str(e)) from e
    if not written:
        raise errors.FusedRLError(f"no train or eval records in {args.run_dir}/metrics.jsonl")
    for path in written:
        print(path)
    return 0


# --- export -----------------------------------------------------------------------------------

def add_export_parser(commands) -> None:
    p = commands.add_parser(
        "export", help="merge a LoRA adapter into its base model (a Hugging Face directory)",
        description="Fold a PEFT LoRA adapter directory (a run's final_adapter/, a checkpoint's "
                    "policy_adapter/ or PEFT's own) into its base model's weights and write a "
                    "transformers-loadable directory.")
    p.add_argument("adapter",
                   help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--merge", action="store_true",
                   help="write the merged model (required: the adapter "
                        "directory itself is already PEFT's format)")
    p.add_argument("--out", required=True,
                   help="output directory: new, empty, or an earlier export (with "
                        "--overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --out (never a directory "
                        "fusedrl did not make, nor an input)")
    p.add_argument("--base",
                   help="base model directory (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default="auto",
                   help="float32 | bfloat16 | float16 | auto (the base checkpoint's)")
    add_debug_flag(p)
    p.set_defaults(run=run_export)


def _adapter_base(adapter: str) -> str:
    """The base model an adapter directory records (checked before torch is imported)."""
    config = f"{adapter}/adapter_config.json"
    try:
        base = json.loads(open(config, encoding="utf-8").read()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise errors.UsageError(
            f"{adapter}: not a PEFT adapter directory ({config}: {e})") from None
    if not base:
        raise errors.UsageError(f"{config} names no base_model_name_or_path: give --base")
    return base


def run_export(args) -> int:
    if not args.merge:
        raise errors.UsageError(
            "nothing to export without --merge: the adapter directory is already PEFT's "
            "format; --merge writes the merged model")
    base = args.base or _adapter_base(args.adapter)
    path_checks.check_model_path(base, "--base")
    # before importing torch; merge_adapter checks again
    run_dir.check_target(args.out, "export", overwrite=args.overwrite, inputs=[args.adapter, base],
                         option="--out", overwrite_option="--overwrite")
    path_checks.check_output_dir(args.out, "--out")
    from ..model.peft_io import merge_adapter
    merge_adapter(args.adapter, base, args.out, args.dtype, args.overwrite)
    print(f"fusedrl export: merged model written to {args.out}")
    return 0


# --- the command ------------------------------------------------------------------------------

def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """--debug on the top-level parser and on each command (before or after the command name).
    SUPPRESS: a command's parser must not reset a --debug given before the command to False."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=f"show the traceback of an error (also: {errors.DEBUG_ENV}=1)")


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
