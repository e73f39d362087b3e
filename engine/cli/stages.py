"""The training stages' commands (`fusedrl sft | rm | ppo | grpo | distill`: a YAML config plus
`key=value` overrides, checked before the stage imports torch) and `fusedrl plan` of them.
Torch-free until a stage runs.
"""
from __future__ import annotations

import argparse

from .. import errors
from ..config import io as config_io
from ..config.compatibility import table_lines
from ..config.distill import DistillConfig
from ..config.ppo import GRPOConfig, PPOConfig
from ..config.train import RMConfig, SFTConfig
from ..runs import path_checks, run_dir, run_paths
from ..train import trackers
from .flags import add_debug_flag, add_quiet_flag

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
    progress = [o for o in args.overrides if o.startswith("train.progress=")]
    if quiet and progress and progress[-1] != quiet[0]:
        raise errors.UsageError(f"--quiet sets train.progress=false, and the command line sets "
                                f"{progress[-1]}: give one of them")
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
