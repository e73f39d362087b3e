"""The limit every benchmark row is a fraction of: the device's peak bf16 FLOP/s and memory
bandwidth. Datacenter GPUs from their datasheets (dense bf16, no sparsity; HBM); any other GPU and
the CPU measured in the same run (a matmul's rate and a device-to-device copy's bandwidth), and
labelled so: a CPU limit is never presented as a GPU's."""
from __future__ import annotations

import dataclasses
import os

import torch

from . import timing

# Name fragment as torch.cuda.get_device_name reports it -> (label, dense bf16 FLOP/s, HBM bytes/s),
# from NVIDIA's datasheets (SXM parts). Checked in order: H200 before H100, the 40 GB A100 first.
DATASHEET = (
    ("B200", "B200 (datasheet)", 2.25e15, 8.0e12),
    ("H200", "H200 (datasheet)", 989.4e12, 4.8e12),
    ("H100 PCIe", "H100 PCIe (datasheet)", 756.0e12, 2.0e12),
    ("H100", "H100 SXM (datasheet)", 989.4e12, 3.35e12),
    ("A100-SXM4-40GB", "A100 40GB (datasheet)", 312.0e12, 1.555e12),
    ("A100", "A100 80GB (datasheet)", 312.0e12, 2.039e12),
)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What 100% means on this device: `flops_per_s` (bf16 dense on a GPU; on the CPU the measured
    fp32 matmul rate) and `bytes_per_s` (HBM, or the measured copy bandwidth); spread: a measured
    limit's runs (each figure's lowest and highest, and how many)."""
    label: str
    flops_per_s: float
    bytes_per_s: float
    source: str          # "datasheet" | "measured"
    spread: dict | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def datasheet_limits(name: str) -> Limits | None:
    """The table's entry for a GPU named `name`, or None (not in the table)."""
    for fragment, label, flops, bandwidth in DATASHEET:
        if fragment in name:
            return Limits(label, flops, bandwidth, "datasheet")
    return None


# A measured limit is the best of RUNS runs of each measure (the fastest call of each run): the
# machine's other work only ever slows a call down, so the best is the stable figure (one run's
# median moved 2.6x between two runs on a shared CPU). The two measures alternate, so both see
# the same stretch of the machine's load; the same sizes with --quick or without.
RUNS = 9


def _spread(values: list[float]) -> dict:
    return {"lowest": min(values), "highest": max(values), "runs": len(values)}


def measured_limits(device: torch.device) -> Limits:
    """The device's limits measured here, the best of RUNS runs: a square matmul's rate (bf16 on
    a GPU, fp32 on the CPU, whose bf16 matmul is emulated) and a copy's bandwidth (read + write
    bytes per second; 128 MiB on the CPU, four times its last-level cache here)."""
    gpu = device.type == "cuda"
    n, copy_bytes = (8192, 1 << 30) if gpu else (512, 128 << 20)
    dtype = torch.bfloat16 if gpu else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    src = torch.empty(copy_bytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    flops, bandwidth = [], []
    for _ in range(RUNS):
        matmul = timing.measure(lambda: torch.mm(a, b), device, min_reps=10, budget_s=0.1)
        flops.append(2 * n**3 / matmul.best_s)
        copy = timing.measure(lambda: dst.copy_(src), device, min_reps=10, budget_s=0.1)
        bandwidth.append(2 * copy_bytes / copy.best_s)
    label = "GPU (measured)" if gpu else "CPU (measured: fp32 matmul, copy bandwidth)"
    spread = {"flops_per_s": _spread(flops), "bytes_per_s": _spread(bandwidth)}
    if not gpu:  # another process's work slows every run alike, which the best cannot undo
        load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
        spread.update(load_average=load, cores=cores)
        if load > cores:
            label += f"; under load: {load:.1f} processes ready on {cores} cores, a low limit"
    return Limits(label, max(flops), max(bandwidth), "measured", spread)


def device_limits(device: torch.device) -> Limits:
    """The datasheet's limits for a GPU in the table, else the measured ones."""
    if device.type == "cuda":
        known = datasheet_limits(torch.cuda.get_device_name(device))
        if known is not None:
            return known
    return measured_limits(device)
