"""The distillation divergence from two LM heads, side by side: ours (linear_distill_divergence:
the fused Triton kernels on a GPU, the PyTorch row chunks on the CPU), plain PyTorch (both [N, V]
logits, log_softmax, the divergence, autograd: reference.linear_distill_divergence), TRL 1.x's
chunked divergence (_chunked_divergence_loss) and Liger's JSD (LigerFusedLinearJSD on a GPU; on
the CPU, where its inner kernel is Triton's, its chunked PyTorch LigerFusedLinearJSDLoss with the
hard loss off). Same inputs for all: student [N, H], a teacher twice as wide, a mask with 10%
of the rows off, beta 0.5 (the JSD, the most work), temperature 0.7.

Per variant and shape: the peak extra memory of forward + backward, the time and the loss. On the
CPU each in a fresh process (the process's peak RSS above what it held once the inputs were made;
one forward + backward after a first one); on a GPU `fusedrl bench` measures them in its own
process one after another (measure_here: max_memory_allocated above the allocated, the memory
freed between them, a time-budgeted loop), this script in a process each (the median of three).
A variant whose plain [N, V] buffers would not fit in the machine's free memory is left out and
says so.

    python bench/bench_distill.py                  # N 4096 and 16384 x H 256 and 896 x V 32000
                                                   # and 151936 (the CPU's takes hours)
    python bench/bench_distill.py --quick          # small shapes: proves it runs
    python bench/bench_distill.py --shapes 4096,256,32000 --json out.json

TRL 1.x and Liger come from the directory .ci/run installs them in (.ci-trl, --trl-dir), put
first on the variants' path; a variant that cannot run says why in its row.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from fusedrl.bench import harness
from fusedrl.bench.context import free_device

HERE = Path(__file__).resolve().parent

VARIANTS = ("torch", "fusedrl", "trl", "liger")
GRID = [f"{n},{h},{v}" for n in (4096, 16384) for h in (256, 896) for v in (32000, 151936)]
QUICK = ["256,64,2048", "512,128,8192"]
BETA, TEMPERATURE = 0.5, 0.7
# fp32 [N, V] buffers plain PyTorch holds at its peak (both heads' logits and log-probs, the
# divergence's terms, autograd's saved tensors): measured 7-9 at N=4096, V=32000 on the CPU.
PLAIN_BUFFERS = 10


def input_dtype(device: torch.device) -> torch.dtype:
    """The heads' and hidden states' dtype: a GPU's training dtype, bf16 (the H200 visit's fp32 rows
    measured fp32 GEMMs, which no training step makes); fp32 on the CPU, whose bf16 matmuls are
    slow."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def make_inputs(n: int, h: int, v: int, device: torch.device) -> dict:
    """The shape's inputs, the same in every process on a device (a seeded generator there: the
    host draws the headline shape's 419M normal samples in seconds, a GPU in milliseconds), floats
    in input_dtype(device)."""
    gen = torch.Generator(device).manual_seed(0)
    x = {"student_hidden": torch.randn(n, h, generator=gen, device=device),
         "student_weight": torch.randn(v, h, generator=gen, device=device) * 2 / h**0.5,
         "teacher_hidden": torch.randn(n, 2 * h, generator=gen, device=device),
         "teacher_weight": torch.randn(v, 2 * h, generator=gen, device=device) * 2 / (2 * h)**0.5,
         "mask": torch.rand(n, generator=gen, device=device) > 0.1}
    dtype = input_dtype(device)
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in x.items()}


def variant_loss(name: str, device: torch.device, chunk_size=None):
    """loss(x, student_hidden, student_weight) -> 0-dim, the mean divergence over valid rows;
    chunk_size: ours' (None: its default)."""
    if name == "torch":
        from fusedrl.kernels import reference
        return lambda x, h, w: reference.linear_distill_divergence(
            h, w, x["teacher_hidden"], x["teacher_weight"], x["mask"], beta=BETA,
            temperature=TEMPERATURE)[0]
    if name == "fusedrl":
        from fusedrl.kernels import linear_distill_divergence
        return lambda x, h, w: linear_distill_divergence(
            h, w, x["teacher_hidden"], x["teacher_weight"], x["mask"], BETA, TEMPERATURE,
            chunk_size=chunk_size).divergence
    if name == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
        return lambda x, h, w: _chunked_divergence_loss(
            h, x["teacher_hidden"], w, x["teacher_weight"], x["mask"], BETA,
            temperature=TEMPERATURE)[0]
    labels = lambda x: torch.where(x["mask"], 0, -100)               # noqa: E731
    if device.type == "cuda":
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
        jsd = LigerFusedLinearJSD(BETA, -100, TEMPERATURE)
        return lambda x, h, w: jsd(h, w, x["teacher_hidden"], x["teacher_weight"], labels(x))
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA,
                                  temperature=TEMPERATURE, compiled=False)
    return lambda x, h, w: jsd(h, w, x["teacher_hidden"], x["teacher_weight"], labels(x))


def run_variant(name: str, n: int, h: int, v: int, device: str, chunk_size=None) -> dict:
    """One variant in this process: forward + backward, its peak extra memory and time."""
    dev = torch.device(device)
    x = make_inputs(n, h, v, dev)
    hidden = x["student_hidden"].requires_grad_()
    weight = x["student_weight"].requires_grad_()
    loss_fn = variant_loss(name, dev, chunk_size)

    def step():
        loss = loss_fn(x, hidden, weight)
        loss.backward()
        return loss

    loss, peak, _ = harness.first_call_peak(step, dev)
    if dev.type == "cuda":
        seconds = harness.time_ms(step, dev, min_reps=3) / 1e3
    else:
        # the second call's time: the first pays one-time imports (autograd.grad's, ~2 s)
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
    return {"peak_extra_mib": peak / 2**20, "seconds": seconds, "loss": loss.item(),
            "grad_weight_norm": weight.grad.norm().item()}


def measure_here(n: int, h: int, v: int, variants: dict, device: torch.device,
                 budget_s: float, chunk_size=None) -> Iterator[dict]:
    """Each variant in this process, one after another (harness.variant_here), its row (as
    run_in_process's) yielded as it is measured. variants: name -> whether it runs here (False: a
    peer not installed, not imported; its row has no figures)."""
    x = make_inputs(n, h, v, device)
    for name, runs in variants.items():
        row = {"variant": name, "n": n, "h": h, "v": v}
        if runs:
            try:
                row.update(_variant_here(name, x, device, budget_s, chunk_size))
            except Exception as error:  # noqa: BLE001 - a variant that cannot run is its row
                row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        free_device(device)
        yield row


def _variant_here(name: str, x: dict, device: torch.device, budget_s: float, chunk_size) -> dict:
    hidden = x["student_hidden"].detach().requires_grad_()
    weight = x["student_weight"].detach().requires_grad_()
    loss_fn = variant_loss(name, device, chunk_size)

    def step():
        loss = loss_fn(x, hidden, weight)
        loss.backward()
        return loss
    measured = harness.variant_here(step, lambda: {"weight": weight.grad}, device, budget_s)
    return {"peak_extra_mib": measured["peak_extra_mib"], "seconds": measured["seconds"],
            "loss": measured["loss"].item(),
            "grad_weight_norm": measured["grads"]["weight"].norm().item()}


def free_bytes() -> int:
    """MemAvailable of /proc/meminfo (the CPU's memory a new process can take)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def run_in_process(name: str, n: int, h: int, v: int, args) -> dict:
    row = {"variant": name, "n": n, "h": h, "v": v}
    if name == "torch" and args.device == "cpu" and PLAIN_BUFFERS * n * v * 4 > free_bytes():
        row["error"] = f"left out: ~{PLAIN_BUFFERS * n * v * 4 / 2**30:.0f} GiB of [N, V] buffers"
        return row
    env = {**os.environ, "PYTHONPATH": args.trl_dir}
    done = subprocess.run([sys.executable, __file__, "--run-variant", name, str(n), str(h),
                           str(v), "--device", args.device]
                          + (["--chunk-size", str(args.chunk_size)] if args.chunk_size else []),
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        row["error"] = done.stderr.strip().splitlines()[-1] if done.stderr else "failed"
    else:
        row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return row


def ratios(rows: list[dict]) -> None:
    """Each row's peak memory and time as a fraction of plain PyTorch's at its shape."""
    plain = {(r["n"], r["h"], r["v"]): r for r in rows
             if r["variant"] == "torch" and "peak_extra_mib" in r}
    for row in rows:
        base = plain.get((row["n"], row["h"], row["v"]))
        if base and "peak_extra_mib" in row:
            row["memory_vs_torch"] = row["peak_extra_mib"] / base["peak_extra_mib"]
            row["time_vs_torch"] = row["seconds"] / base["seconds"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=None, help="N,H,V (default: the grid)")
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trl-dir", default=str(HERE.parent / ".ci-trl"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="ours' rows per chunk on the PyTorch path (default: its own)")
    parser.add_argument("--run-variant", nargs=4, metavar=("NAME", "N", "H", "V"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_variant:
        name, *shape = args.run_variant
        print(json.dumps(run_variant(name, *map(int, shape), args.device, args.chunk_size)))
        return {}
    rows = []
    for shape in args.shapes or (QUICK if args.quick else GRID):
        n, h, v = map(int, shape.split(","))
        rows += [run_in_process(name, n, h, v, args) for name in args.variants]
    ratios(rows)
    meta = harness.run_metadata(torch.device(args.device))
    report = {"meta": {**meta, "beta": BETA, "temperature": TEMPERATURE,
                       "memory": "peak RSS above the process's once its inputs exist (CPU) or "
                                 "max_memory_allocated above allocated (GPU), forward + backward"},
              "rows": rows}
    print(harness.meta_line(meta))
    print(harness.format_table(rows, [("variant", "variant"), ("n", "N"), ("h", "H"),
                                      ("v", "V"), ("peak_extra_mib", "peak MiB"),
                                      ("memory_vs_torch", "x torch mem"), ("seconds", "s"),
                                      ("time_vs_torch", "x torch time"), ("loss", "loss"),
                                      ("error", "error")]))
    if args.json:
        harness.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
