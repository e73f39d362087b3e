"""The commands over what a run wrote: `fusedrl plot` (a run's metrics as PNG curves) and `fusedrl
export` (a LoRA adapter merged into its base model). Torch-free until the work runs.
"""
from __future__ import annotations

import json

from .. import errors
from ..runs import path_checks, run_dir
from .flags import add_debug_flag

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
