"""Measurement helpers shared by the benchmark scripts: timing, peak memory, copy bandwidth,
run metadata, the generation benchmarks' options, and the table/JSON report. Timings are never asserted anywhere; they are reported."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from . import timing
from .timing import synchronize


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> str:
    """The commit under test: FUSEDRL_COMMIT when set (bench/gpu.sh sets it from .whl/COMMIT, written
    where the checkout has its .git: a device's copy of the tree may have none), else git's HEAD
    (with -dirty for uncommitted changes), else "unknown"."""
    if os.environ.get("FUSEDRL_COMMIT"):
        return os.environ["FUSEDRL_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def run_metadata(device: torch.device) -> dict:
    """What a result needs to be comparable: device, versions (torch, Triton, CUDA, NCCL,
    transformers, Python), commit, interpreter mode."""
    nccl = None
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "nccl": nccl,
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def meta_line(meta: dict) -> str:
    """One line of a markdown report naming what made it: commit, device and versions."""
    return (f"Commit {meta['git_commit']}; {meta['device']}; torch {meta['torch']}, triton "
            f"{meta['triton']}, transformers {meta['transformers']}, Python {meta['python']}.\n\n")


def time_ms(fn: Callable[[], object], device: torch.device, *, min_reps: int = 3,
            budget_s: float = 1.0) -> float:
    """Median time of fn in milliseconds after one warm-up call (timing.measure: the Timing, its
    spread included, goes to the open ledger)."""
    return timing.measure(fn, device, min_reps=min_reps, budget_s=budget_s).median_s * 1e3


def host_us(fn: Callable[[], object], device: torch.device, *, calls: int = 50) -> float:
    """Microseconds of host time per call: `calls` calls issued back to back (after a warm-up), timed
    before the device catches up. For an op whose GPU time is shorter than its host time (the small
    RL ops) this is also its wall time per call in a loop; on CPU it is the wall time."""
    fn()
    synchronize(device)
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter() - begin
    synchronize(device)
    return issued / calls * 1e6


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory allocated while fn runs, above what was allocated before (GPU only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def rss_baseline() -> int:
    """This process's resident bytes now, with Linux's peak (VmHWM) reset to them (clear_refs 5):
    what peak_rss_above counts from. ru_maxrss alone keeps the highest point of everything before
    (imports, earlier buffers since freed), which would hide a peak below it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return _status_kib("VmRSS") * 1024
    except (OSError, StopIteration):  # not Linux: the process's peak so far stands in
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_above(baseline: int) -> int:
    """Peak resident bytes since rss_baseline() returned `baseline`, above it (CPU runs)."""
    try:
        peak = _status_kib("VmHWM") * 1024
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(peak - baseline, 0)


def first_call_peak(step: Callable[[], object], device: torch.device) -> tuple[object, int, float]:
    """step() once: (its result, its peak bytes above what was held before it, its seconds). The
    peak is the allocator's on a GPU and the resident set's on the CPU (rss_baseline)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = rss_baseline()
    start = time.perf_counter()
    result = step()
    synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        return result, torch.cuda.max_memory_allocated(device) - base, seconds
    return result, peak_rss_above(rss_before), seconds


def variant_here(step: Callable[[], object], grads: Callable[[], dict], device: torch.device,
                 budget_s: float) -> dict:
    """One variant of a loss measured in this process, after the one before it: step() once (its
    peak above what was held before it: first_call_peak), grads() then (tensors, copied to the
    CPU), then step() timed (timing.measure, its loop in the open ledger; budget_s at most, the
    case's budget bounding it). {"loss", "grads", "peak_extra_mib", "seconds"}; what the variant
    allocated is freed by the caller dropping its tensors (context.free_device)."""
    loss, peak, _ = first_call_peak(step, device)
    # copies (a CPU tensor's .cpu() is itself: the timed calls would add into it)
    copied = {name: t.detach().to("cpu", copy=True) for name, t in grads().items()}
    out = {"loss": loss.detach().float().cpu(), "grads": copied, "peak_extra_mib": peak / 2**20}
    out["seconds"] = timing.measure(step, device, min_reps=3, budget_s=budget_s).median_s
    return out


def copy_bandwidth_gbps(device: torch.device, n_bytes: int, budget_s: float = 1.0) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second): the memory roofline."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, budget_s=budget_s)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype = torch.bfloat16,
                  budget_s: float = 1.0) -> float:
    """Achieved TFLOP/s of an n x n x n matmul in ``dtype``: the compute roofline."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, budget_s=budget_s)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Plain-text table; columns are (key, header). Missing values print as '-'."""
    def cell(row, key):
        value = row.get(key)
        if value is None:
            return "-"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    table = [[header for _, header in columns]] + [[cell(r, k) for k, _ in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def generation_parser(description: str) -> argparse.ArgumentParser:
    """The options every generation benchmark takes (--quick, --batch-sizes, --prompt-len,
    --new-tokens, --out); a script adds its own, then calls `generation_args`."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny fp32 model on the CPU")
    p.add_argument("--batch-sizes", type=int, nargs="+")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--out", default=None, help="JSON results path (default: bench/results/NAME[_quick].json)")
    return p


def generation_args(parser: argparse.ArgumentParser, name: str, quick: dict, full: dict,
                    argv: list[str] | None = None) -> argparse.Namespace:
    """Parse argv (default: the command line), then fill what was not given from `quick` or `full`
    (by --quick) and the default output path bench/results/<name>[_quick].json."""
    args = parser.parse_args(argv)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = str(Path(__file__).resolve().parent / "results" / f"{name}{'_quick' if args.quick else ''}.json")
    return args


def write_json(path: str, payload: dict) -> None:
    """Write, then rename: a crash never leaves a half-written result."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
