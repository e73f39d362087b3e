"""The `fusedrl` command. Each stage adds a subcommand; this module only parses and dispatches."""
from __future__ import annotations

import argparse
import sys

from engine import demo_cli, generate_cli, plot_cli, ppo_cli, rm_cli, sft_cli


def info(_args: argparse.Namespace) -> int:
    """Print versions, devices and which kernel backend each device would use."""
    import torch

    import kernels
    from kernels.dispatch import requested_backend, triton_interpreting

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"torch {torch.__version__}, triton {triton_version}, CUDA available: {torch.cuda.is_available()}")
    print(f"requested backend: {requested_backend()} (TRITON_INTERPRET={int(triton_interpreting())})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"  {device}: ops run on '{kernels.backend_for(torch.empty(0, device=device))}'")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedrl", description="Kernel-optimized single-node RLHF.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, devices and kernel backends").set_defaults(run=info)
    for module in (demo_cli, generate_cli, sft_cli, rm_cli, ppo_cli, plot_cli):
        module.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
