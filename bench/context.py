"""What every suite of a `fusedrl bench` run reads: the device, its limits, the options, the
progress bar."""
from __future__ import annotations

import dataclasses
import importlib.metadata

import torch

from .command import BenchOptions
from .devices import Limits


@dataclasses.dataclass(frozen=True)
class Context:
    device: torch.device
    limits: Limits
    options: BenchOptions

    @property
    def quick(self) -> bool:
        return self.options.quick

    @property
    def dtype(self) -> torch.dtype:
        """bf16 on a GPU; fp32 on the CPU (whose bf16 matmuls are emulated)."""
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def wanted(self, name: str) -> bool:
        """Whether the case `name` runs (the option only=: a case whose name holds one of them)."""
        return not self.options.only or any(part in name for part in self.options.only)

    def wants_family(self, family: str) -> bool:
        """Whether any case of the family named `family` (its cases' names start with it) may
        run: only= names the family or one of its cases."""
        return not self.options.only or any(part in family or part.startswith(family)
                                            for part in self.options.only)

    def progress(self, items, desc: str):
        """items with a progress bar on stderr (where it is a terminal)."""
        from tqdm.auto import tqdm
        return tqdm(list(items), desc=desc, disable=None, leave=False)

    def bandwidth_fraction(self, bytes_per_s: float) -> float:
        return bytes_per_s / self.limits.bytes_per_s

    def flops_fraction(self, flops_per_s: float) -> float:
        return flops_per_s / self.limits.flops_per_s

    @property
    def bandwidth_limit(self) -> str:
        return f"memory bandwidth, {self.limits.label}"

    @property
    def flops_limit(self) -> str:
        return f"FLOP/s, {self.limits.label}"


def peer_version(distribution: str) -> str | None:
    """The installed version of a peer's distribution (the first on the path), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
