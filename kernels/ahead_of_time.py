"""Triton kernels compiled before their first launch, in parallel, from recorded launches.

Triton compiles a kernel the first time it is launched with a new specialization, in the
launching process, one after another: about a second each on a GPU machine's host. A short job on
a fresh machine pays all of it (a short `fusedrl demo` launches 37 distinct specializations).
`compile_ahead(records)` compiles the launches a job will make in child processes while the job
sets up; `wait()` returns once they are in Triton's cache (TRITON_CACHE_DIR), where the job's
first launch of each finds it.

A record is one launch as tests/tools/gpucheck/record.py writes it under the interpreter:
{"kernel": "module:qualname", "args": [[name, description], ...] (a tensor by dtype and address
modulo 16, an int by value, a float, a constant), "options": its constexprs and launch options}.
A child rebuilds the arguments (`argument`) and calls the kernel's `warmup`, which binds and
specializes them as the launch does (pointer alignment, ints equal to 1 or divisible by 16) and
compiles under the key the launch looks up. The children never touch the GPU: a stand-in driver
(`TargetDriver`) names its architecture to Triton, so no CUDA context is made per child. Spawned,
not forked: the parent's threads and CUDA state stay its own.

Without a CUDA device, or under the interpreter, `compile_ahead` starts nothing. A record that no
longer binds (a kernel renamed, an argument added) fails in its child and is counted, never
raised: that launch compiles when it runs, as without this module.

A list compiled whole leaves a stamp in Triton's cache, keyed by the records, the sources of
this package's kernels, Triton's version and the architecture; the next `compile_ahead` of the
same list finds it and starts nothing (a warm run would otherwise spawn its children only to find
every binary cached). A stamp outliving the binaries (the cache pruned by hand) costs only what
this module saves: each launch compiles when it first runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

# Children at most by default: each imports torch (~0.3 GB of host memory) before it compiles.
MAX_WORKERS = 16


class TargetDriver:
    """The driver Triton's JIT asks for its target and device when it compiles without launching
    (`warmup`, `preload`): a stand-in naming sm_`arch`, so no GPU is needed."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0


def jit_function(kernel: str):
    """The JITFunction a record names ("module:qualname")."""
    module, name = kernel.split(":")
    return getattr(importlib.import_module(module), name)


def argument(desc: dict):
    """A launch argument rebuilt from its record: a small CPU tensor of the recorded dtype whose
    address has the recorded offset modulo 16 (what Triton specializes a pointer on), or the
    recorded int, float or constant."""
    if "tensor" in desc:
        dtype = getattr(torch, desc["tensor"])
        size = torch.empty(0, dtype=dtype).element_size()
        buffer = torch.empty(64 // size + 16, dtype=dtype)
        # The buffer is >= 64-byte aligned: an offset of misalign bytes gives the recorded class.
        return buffer[desc["misalign"] // size:]
    return next(iter(desc.values()))


def compile_record(record: dict):
    """Compile one record for the active driver's target (in a child: `TargetDriver`) through
    the kernel's `warmup`; its CompiledKernel (None when a Triton jit_cache_hook stopped it)."""
    args = [argument(desc) for _, desc in record["args"]]
    return jit_function(record["kernel"]).warmup(*args, grid=(1,), **record["options"])


def _child(arch: int) -> None:
    from triton.runtime import driver
    driver.set_active(TargetDriver(arch))


def _compiled(record: dict) -> str | None:
    """A child's work on one record: None when compiled, else why not (one line)."""
    try:
        compile_record(record)
    except Exception as error:  # a stale record: this launch compiles when it runs
        return f"{record.get('kernel')}: {type(error).__name__}: {str(error)[:200]}"
    return None


class AheadCompiles:
    """The compiles `compile_ahead` began; `wait()` -> (compiled, [why each other was not]),
    writing `stamp` (an empty file) when every one compiled."""

    def __init__(self, pool: ProcessPoolExecutor | None = None, futures: list[Future] = (),
                 stamp: Path | None = None):
        self._pool, self._futures, self._stamp = pool, list(futures), stamp

    def wait(self) -> tuple[int, list[str]]:
        failed = []
        for future in self._futures:
            try:
                why = future.result()
            except Exception as error:  # the child itself died (out of memory, a signal)
                why = f"{type(error).__name__}: {error}"
            if why is not None:
                failed.append(why)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._stamp is not None and self._futures and not failed:
            with contextlib.suppress(OSError):  # unwritten, the next run compiles ahead again
                self._stamp.parent.mkdir(parents=True, exist_ok=True)
                self._stamp.touch()
        return len(self._futures) - len(failed), failed


def stamp_path(records: list[dict], arch: int) -> Path | None:
    """The stamp in Triton's cache (TRITON_CACHE_DIR, else its default) saying `records` were
    all compiled for sm_`arch` from this package's kernel sources by this Triton; None before
    Triton 3.4 (no `triton.knobs` to name its cache)."""
    import triton
    try:
        from triton import knobs
    except ImportError:
        return None

    digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode())
    digest.update(f"triton {triton.__version__} sm_{arch}".encode())
    # every source, not only the recorded kernels' modules: a kernel's binary also depends on
    # the @triton.jit helpers it calls from other files
    for source in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(source.read_bytes())
    return Path(knobs.cache.dir) / "fusedrl-ahead" / digest.hexdigest()[:32]


def compile_ahead(records: list[dict], workers: int | None = None) -> AheadCompiles:
    """Compile `records` for this process's CUDA device in up to `workers` children (default: the
    host's cores, at most MAX_WORKERS and one per record); returns at once. Nothing starts without
    an NVIDIA CUDA device (the stand-in driver names a CUDA target; ROCm's GPUs are not one),
    under the interpreter, when Triton is missing, or when the same list was compiled whole
    before (its stamp, `stamp_path`)."""
    from .dispatch import triton_interpreting
    if (not records or not torch.cuda.is_available() or torch.version.hip is not None
            or triton_interpreting() or importlib.util.find_spec("triton") is None):
        return AheadCompiles()
    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    stamp = stamp_path(records, arch)
    if stamp is not None and stamp.exists():
        return AheadCompiles()
    return compile_in_children(records, arch, workers, stamp)


def compile_in_children(records: list[dict], arch: int, workers: int | None = None,
                        stamp: Path | None = None) -> AheadCompiles:
    """Compile `records` for sm_`arch` in up to `workers` spawned children (see
    `compile_ahead`), whatever this machine has; returns at once; `stamp` is written once every
    record compiled. The children must not inherit TRITON_INTERPRET=1: a kernel module imported
    under it defines interpreted kernels, which compile nothing."""
    count = max(1, min(len(records), workers or min(os.cpu_count() or 1, MAX_WORKERS)))
    pool = ProcessPoolExecutor(count, mp_context=get_context("spawn"), initializer=_child,
                               initargs=(arch,))
    return AheadCompiles(pool, [pool.submit(_compiled, record) for record in records], stamp)
