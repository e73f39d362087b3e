"""`fusedrl plan STAGE [--config FILE] [key=value ...] --gpus N [--gpus-per-node G] --gpu-memory
80GB [--json]`: the stage's config read as the stage reads it (config/io.py's command_config), the
options the plan does not read (output_dir, the data files) filled in when left out, the parallel
options' combinations checked as the run checks them (engine/parallel/validate.py), the model
directories checked (config.json is all they need)."""
from __future__ import annotations

import json

from ..runs import path_checks
from ..config import io as config_io
from ..errors import UsageError
from .units import parse_bytes

# Required options the plan does not read: a placeholder stands in when the user gives none.
_UNREAD = {"sft": ("output_dir", "data.train_file"), "rm": ("output_dir", "data.train_file"),
           "ppo": ("output_dir", "prompts_file"), "grpo": ("output_dir", "prompts_file"),
           "distill": ("output_dir", "prompts_file")}
PLACEHOLDER = "(not read by the plan)"


def plan_config(stage: str, config_cls, path, overrides: list[str]):
    """The stage's config from the YAML file and overrides, placeholders for what the plan does not
    read."""
    fill = dict.fromkeys(_UNREAD[stage], PLACEHOLDER)
    config = config_io.command_config(config_cls, path, overrides, fill)
    try:
        config.require_model()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return config


def run_plan(stage: str, config_cls, args) -> int:
    """Print the plan (text, or one JSON object with --json); exit 0 whether or not it fits."""
    try:
        gpu_memory = parse_bytes(args.gpu_memory)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.gpus < 1:
        raise UsageError(f"--gpus={args.gpus}: expected at least 1")
    per_node = args.gpus if args.gpus_per_node is None else args.gpus_per_node
    if not (0 < per_node <= args.gpus and args.gpus % per_node == 0):  # 0 too: no node has none
        raise UsageError(
            f"--gpus-per-node={args.gpus_per_node}: expected a divisor of --gpus={args.gpus}")
    cfg = plan_config(stage, config_cls, args.config, args.overrides)
    models, _ = cfg.paths()
    for option, model_dir in models.items():
        if model_dir:
            path_checks.check_model_path(model_dir, option)
    from ..parallel.validate import validate
    from .planner import plan_stage
    from .report import format_plan, to_json
    validate(cfg.parallel_job(), args.gpus, per_node)
    plan = plan_stage(cfg, args.gpus, gpu_memory, gpus_per_node=per_node)
    print(json.dumps(to_json(plan)) if args.json else format_plan(plan, f"fusedrl plan {stage}"))
    return 0
