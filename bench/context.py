"""What every suite of a `fusedrl bench` run reads: the device, its limits, the options, and what
a suite's cases share (a model built once, released when no next case names it: the runner calls
`release` between cases, so each case finds the device as the one before it found it)."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.metadata
from typing import Callable, Iterator

import torch

from .devices import Limits
from .options import BenchOptions

INTERPRETED = "fusedrl (Triton interpreter)"


@dataclasses.dataclass(frozen=True)
class Context:
    device: torch.device
    limits: Limits
    options: BenchOptions
    _shared: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    _releases: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    _on_disk: set = dataclasses.field(default_factory=set, compare=False, repr=False)

    @property
    def quick(self) -> bool:
        return self.options.quick

    @property
    def dtype(self) -> torch.dtype:
        """bf16 on a GPU; fp32 on the CPU (whose bf16 matmuls are emulated)."""
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    @property
    def interpreted(self) -> bool:
        """Our Triton kernels run in the interpreter (the CPU, and only when asked)."""
        return self.device.type == "cpu" and self.options.interpret

    def named(self, row: dict, model_paths: bool) -> dict:
        """row with our implementation named "fusedrl (Triton interpreter)" where it ran there: not
        a row of the model-scale paths (Case.model_paths), which the interpreter never runs."""
        if self.interpreted and not model_paths and row["impl"] == "fusedrl":
            row["impl"] = INTERPRETED
        return row

    def wanted(self, name: str) -> bool:
        """Whether the case `name` ("suite: case") runs (the option only=: a case whose name holds
        one of them)."""
        return not self.options.only or any(part in name for part in self.options.only)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """One suite: what its cases shared (`shared`) is released when it ends."""
        try:
            yield
        finally:
            self.release(suite_end=True)

    def shared(self, key: str, make: Callable[[], object],
               release: Callable[[object], None] | None = None, on_disk: bool = False):
        """make()'s value, made once and kept while the cases that follow name `key` in their
        Case.shares (release(value) when it is dropped); on_disk: a value that holds no device
        memory (a checkpoint's directory), kept until the suite ends."""
        if key not in self._shared:
            value = make()
            self._shared[key] = value
            if release is not None:
                self._releases[key] = release
            if on_disk:
                self._on_disk.add(key)
        return self._shared[key]

    def release(self, keep: tuple[str, ...] = (), suite_end: bool = False) -> None:
        """Drop every shared value but those named in `keep` and, until the suite's end, those
        on disk (the last made first, each with its release), then free what the device holds
        (free_device)."""
        kept = set(keep) | (set() if suite_end else self._on_disk)
        for key in reversed([k for k in self._shared if k not in kept]):
            value = self._shared.pop(key)
            self._on_disk.discard(key)
            release = self._releases.pop(key, None)
            if release is not None:
                release(value)
            del value
        free_device(self.device)

    def bandwidth_fraction(self, bytes_per_s: float) -> float:
        return bytes_per_s / self.limits.bytes_per_s

    def flops_fraction(self, flops_per_s: float) -> float:
        return flops_per_s / self.limits.flops_per_s

    @property
    def bandwidth_limit(self) -> str:
        return "memory bandwidth"

    @property
    def flops_limit(self) -> str:
        return "FLOP/s"


def free_device(device: torch.device) -> None:
    """Collect what no one holds (reference cycles included: on a GPU an engine's model runner and
    its decode graphs point at each other, the KV pool inside) and, on a GPU, hand the
    allocator's cached blocks back to the driver and start the peak over, so the next case, or a
    peer's process, finds the memory free and its peak its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peer_version(distribution: str) -> str | None:
    """The installed version of a peer's distribution (the first on the path), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
