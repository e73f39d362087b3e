"""Counted memory traffic next to its floor: decode steps of `fusedrl.engine.LLM` (traffic_decode)
and the phases of one PPO iteration (traffic_ppo), on the path a GPU runs. On the CPU the Triton
kernels run in the interpreter (TRITON_INTERPRET=1, set here when no GPU is present).

Decode configurations (DECODE_CONFIGS): batch 128 at context 33, top-p 1; batch 128 at context
256, top-p 0.9; and batch 1 at context 256 (the decode step's kernel budget is held at batch 1 and
128). The exact mode's step next to the default's (EXACT_CONFIGS): batch 1 and 128 at context 256.

    python tests/tools/traffic.py [--json OUT.json] [--table OUT.md] [--layers 2] [--no-ppo]
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusedrl.bench import harness  # noqa: E402
from traffic_decode import decode_report, decode_table, exact_mode_report, exact_mode_table  # noqa: E402
from traffic_ppo import ppo_report, ppo_table  # noqa: E402

DECODE_CONFIGS = ({"batch": 128, "context": 33, "top_p": 1.0}, {"batch": 128, "context": 256, "top_p": 0.9},
                  {"batch": 1, "context": 256, "top_p": 0.9})
EXACT_CONFIGS = ({"batch": 1, "context": 256, "top_p": 0.9}, {"batch": 128, "context": 256, "top_p": 0.9})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--table", type=Path)
    parser.add_argument("--layers", type=int, default=2, help="decode layers counted (extrapolated to 24)")
    parser.add_argument("--no-ppo", action="store_true", help="the decode reports only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    report = {"meta": harness.run_metadata(torch.device(args.device)),
              "decode": [decode_report(layers=args.layers, device=args.device, **c) for c in DECODE_CONFIGS],
              "exact": [exact_mode_report(device=args.device, **c) for c in EXACT_CONFIGS]}
    if not args.no_ppo:
        report["ppo"] = ppo_report(device=args.device)
    text = "\n".join([decode_table(r) for r in report["decode"]] + [exact_mode_table(r) for r in report["exact"]]
                      + ([ppo_table(report["ppo"])] if "ppo" in report else []))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.table:
        args.table.write_text(harness.meta_line(report["meta"]) + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
