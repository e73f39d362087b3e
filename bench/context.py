"""What every suite of a `fusedrl bench` run reads: the device, its limits, the options, and what
a suite's cases share (a model built once, removed when the suite ends)."""
from __future__ import annotations

import contextlib
import dataclasses
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
    _stack: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack,
                                                     compare=False, repr=False)

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

    def named(self, row: dict) -> dict:
        """row with our implementation named "fusedrl (Triton interpreter)" where it ran there."""
        if self.interpreted and row["impl"] == "fusedrl":
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
            self._stack.close()
            self._shared.clear()

    def shared(self, key: str, make: Callable[[], object],
               release: Callable[[object], None] | None = None):
        """make()'s value, made once per suite (release(value) when the suite ends)."""
        if key not in self._shared:
            value = make()
            self._shared[key] = value
            if release is not None:
                self._stack.callback(release, value)
        return self._shared[key]

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


def peer_version(distribution: str) -> str | None:
    """The installed version of a peer's distribution (the first on the path), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
