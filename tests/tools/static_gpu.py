"""Static GPU check: every Triton launch of a representative workload compiled ahead of time for
sm_80 and sm_90 as the JIT would specialize it, and the CUDA backend's objects, without a GPU.

Per kernel and configuration: compiled or the error, registers, spill bytes, shared memory, the
access widths of its named main streams (tests/tools/gpucheck/streams.py), global load/store kinds in
SASS, and occupancy (blocks and warps per SM). Writes JSON and a markdown table.

    python tests/tools/static_gpu.py [--json OUT.json] [--table OUT.md] [--check] [--no-cuda] [--quick]
                               [--archs 80,90]

--check exits 1 on a compile error, any spill, or a named main stream with no 128-bit access in an
aligned launch, except the kernels listed in gpucheck.streams.ALLOWED_FAILURES (reported, not fatal).
Recording runs the workload in a child process under TRITON_INTERPRET=1; compiling needs the
real JIT functions, so it runs here without the interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from fusedrl.bench import harness

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# The JIT's default (fused multiply-add on), stated so triton 3.9 does not warn in every process.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ARCHS = (80, 90)


def _compiling_process() -> None:
    # Kernels must decorate as real JITFunctions here, whatever the caller runs under (the test
    # suite sets TRITON_INTERPRET=1); fresh (spawned) processes import them after this.
    os.environ.pop("TRITON_INTERPRET", None)


def _analyze(job):
    from gpucheck.compile import analyze
    return analyze(*job)


def problems(row: dict) -> list[str]:
    """Why `row` (a Triton or CUDA row) fails the check; [] if it passes."""
    if "error" in row:
        return [f"compile error: {row['error']}"]
    found = [f"spills {row['spill_bytes']} bytes"] if row["spill_bytes"] else []
    gemv_streams = _gemv_streams(row)
    if _wants_tensor_cores(row) and gemv_streams is None and not row.get("mma"):
        found.append("16-bit GEMM without tensor-core instructions")
    if row.get("aligned"):
        found += [f"{name}: no 128-bit access ({s['widths']})" for name, s in row.get("streams", {}).items()
                  if 128 not in s["widths"] and name not in (gemv_streams or ())]
    return found


def _wants_tensor_cores(row: dict) -> bool:
    from gpucheck.streams import TENSOR_CORE_KERNELS
    weight = TENSOR_CORE_KERNELS.get(row["kernel"])
    return weight is not None and row["args"].get(weight, {}).get("tensor") in ("bfloat16", "float16")


def _gemv_streams(row: dict) -> tuple[str, ...] | None:
    """The streams a GEMV launch of a GEMM kernel (its row tile under 16: GEMV_ROW_TILE) may read
    narrower; None for any other launch."""
    from gpucheck.streams import GEMV_ROW_TILE
    tile, streams = GEMV_ROW_TILE.get(row["kernel"], (None, ()))
    return streams if tile is not None and row.get("config", {}).get(tile, 16) < 16 else None


def allowed(kernel: str) -> str | None:
    from gpucheck.streams import ALLOWED_FAILURES
    return next((why for prefix, why in ALLOWED_FAILURES.items() if kernel.startswith(prefix)), None)


def _widths(row: dict) -> str:
    widths = [f"{n} {s['kind']} {'/'.join(map(str, s['widths'])) or '-'}" for n, s in row.get("streams", {}).items()]
    # tensor-core instructions in SASS, where there are any (the GEMM kernels)
    return "; ".join(widths + [f"{name} x{count}" for name, count in row.get("mma", {}).items()])


def table(report: dict) -> str:
    lines = ["| kernel | arch | warps | config | int args (one of their class) | aligned | regs | spill | "
             "smem | blocks/SM (warps) | main streams: bits per access; tensor-core instructions | status |", "|" + "---|" * 12]
    for row in report["triton"]:
        config = ", ".join(f"{k}={v}" for k, v in row["config"].items())
        config += " | " + ", ".join(f"{k}={d['int']}" for k, d in row["args"].items() if "int" in d)
        status = "; ".join(row["problems"]) or "ok"
        if row["problems"] and row.get("allowed"):
            status = f"allowed ({row['allowed']}): {status}"
        if "error" in row:
            lines.append(f"| {row['kernel']} | {row['arch']} | {row['num_warps']} | {config} | "
                         f"{row['aligned']} | | | | | | {status} |")
            continue
        occ = row["occupancy"]
        lines.append(f"| {row['kernel']} | {row['arch']} | {row['num_warps']} | {config} | {row['aligned']} | "
                     f"{row['registers']} | {row['spill_bytes']} | {row['shared_bytes']} | "
                     f"{occ['blocks']} ({occ['warps']}, {occ['limit']}) | {_widths(row)} | {status} |")
    if report["cuda"]:
        lines += ["", "| CUDA kernel | arch | regs | spill | static smem | blocks/SM (warps) |", "|" + "---|" * 6]
        for row in report["cuda"]:
            occ = row["occupancy"]
            lines.append(f"| {row['kernel']} | {row['arch']} | {row['registers']} | {row['spill_bytes']} | "
                         f"{row['static_shared']} | {occ['blocks']} ({occ['warps']}, {occ['limit']}) |")
    return "\n".join(lines) + "\n"


def build_report(with_cuda: bool, quick: bool = False, archs=ARCHS) -> dict:
    import triton
    from gpucheck.record import record_workload
    launches = record_workload(quick)
    jobs = [(record, arch) for record in launches for arch in archs]
    with ProcessPoolExecutor(max(1, min(os.cpu_count() or 1, 8)), mp_context=get_context("spawn"),
                             initializer=_compiling_process) as pool:
        rows = list(pool.map(_analyze, jobs))
    rows.sort(key=lambda r: (r["kernel"], r["arch"], json.dumps(r["config"], sort_keys=True),
                             json.dumps(r["args"], sort_keys=True)))
    for row in rows:
        row["problems"] = problems(row)
        row["allowed"] = allowed(row["kernel"])
    cuda = []
    if with_cuda:
        from gpucheck.cuda import cuda_rows
        cuda = cuda_rows(archs)
        for row in cuda:
            row["problems"] = problems(row)
    return {"triton_version": triton.__version__, "archs": [f"sm_{a}" for a in archs],
            "launches": len(launches), "triton": rows, "cuda": cuda}


def failures(report: dict) -> list[str]:
    """Check failures not excused by ALLOWED_FAILURES."""
    out = [f"{r['kernel']} {r['arch']} {r['config']}: {p}" for r in report["triton"] if not r["allowed"]
           for p in r["problems"]]
    return out + [f"{r['kernel']} {r['arch']}: {p}" for r in report["cuda"] for p in r["problems"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--table", type=Path, help="write the markdown table here")
    parser.add_argument("--check", action="store_true", help="exit 1 on a failure")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA backend (csrc/)")
    parser.add_argument("--quick", action="store_true", help="a smaller workload that still reaches every kernel (a fast local check)")
    parser.add_argument("--archs", default="80,90", help="compute capabilities, e.g. 90")
    args = parser.parse_args(argv)
    archs = tuple(int(a) for a in args.archs.split(","))
    report = {"meta": harness.run_metadata(torch.device("cpu")),
              **build_report(with_cuda=not args.no_cuda, quick=args.quick, archs=archs)}
    text = table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.table:
        args.table.write_text(harness.meta_line(report["meta"]) + text)
    if not (args.json or args.table):
        print(text)
    bad = failures(report)
    excused = sum(bool(r["problems"]) for r in report["triton"] if r["allowed"])
    print(f"static_gpu: {len(report['triton'])} Triton configurations ({report['launches']} launches x "
          f"{len(archs)} archs), {len(report['cuda'])} CUDA kernels; {len(bad)} failures, "
          f"{excused} allowed", file=sys.stderr)
    for line in bad:
        print("  " + line, file=sys.stderr)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
