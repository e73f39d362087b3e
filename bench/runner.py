"""A `fusedrl bench` run: the device and its limits, each suite's rows, the meta record, the table
printed and (with output_dir) results.json, results.md and the charts written after each suite, so a
run cut short leaves what it measured.
One process, one device (command.py refuses torchrun).
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess

from . import results
from .command import BenchOptions

PEERS = ("torch", "triton", "transformers", "trl", "liger-kernel", "matplotlib")


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return lines[0] if lines else None


def _versions() -> dict:
    out = {}
    for dist in ("fusedrl", *PEERS):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run_meta(device, limits, options: BenchOptions, command: str) -> dict:
    """What makes a result comparable: device, driver, limits, versions, commit, command, time."""
    from . import harness
    meta = harness.run_metadata(device)
    meta.update(commit=meta["git_commit"], driver=_driver(), limits=limits.as_dict(),
                versions=_versions(), command=command,
                model=options.model, seed=options.seed, quick=options.quick)
    return meta


def suite_backend(suite: str, device) -> str:
    """The kernel backend a suite's engine runs on: the default ("auto") on a GPU; on the CPU the
    PyTorch backend, what the engine runs there (the kernels suite names its backends itself: its
    Triton rows run in the interpreter)."""
    return "auto" if device.type == "cuda" or suite == "kernels" else "torch"


def run(suites: list[str], options: BenchOptions, command: str) -> dict:
    """Run the suites in order; returns the payload (meta and rows). command: the command line,
    as the record names it."""
    import torch
    if not torch.cuda.is_available():
        # Triton reads this when the kernels are defined, i.e. at `import fusedrl.kernels`.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .context import Context
    from .devices import device_limits
    from .suites import generate, kernels, rl, train
    runners = {"kernels": kernels.rows, "generate": generate.rows, "train": train.rows,
               "rl": rl.rows}
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                          else "cpu")
    limits = device_limits(device, options.quick)
    ctx = Context(device, limits, options)
    payload = {"meta": run_meta(device, limits, options, command), "rows": []}
    payload["meta"]["backends"] = {suite: suite_backend(suite, device) for suite in suites}
    print(f"fusedrl bench {' '.join(suites)}: {payload['meta']['device']}, limits "
          f"{limits.label}: {limits.flops_per_s / 1e12:.3g} TFLOP/s, "
          f"{limits.bytes_per_s / 1e9:.3g} GB/s", flush=True)
    from fusedrl.kernels import use_backend
    for suite in suites:
        with use_backend(suite_backend(suite, device)):
            payload["rows"] += runners[suite](ctx)
        if options.output_dir:
            results.write(options.output_dir, payload)
    print(results.markdown(payload))
    if options.output_dir:
        print(f"results: {os.path.join(options.output_dir, 'results.json')}")
    return payload
