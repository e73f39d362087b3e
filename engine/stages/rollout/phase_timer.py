"""Wall time and peak GPU memory of each phase of a PPO iteration (generate, score, reference, old,
train), as the run log reports them."""
from __future__ import annotations

import contextlib
import time

import torch

from ...train.runlog import peak_memory_mb


class PhaseTimer:
    """Wall time and peak GPU memory of each named phase of an iteration."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.peak_mb = device, {}, {}

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        peak = peak_memory_mb(self.device)
        if peak is not None:
            self.peak_mb[name] = max(self.peak_mb.get(name, 0.0), peak)

    def metrics(self) -> dict:
        return {**{f"time_{k}": v for k, v in self.seconds.items()},
                **{f"peak_mem_mb_{k}": v for k, v in self.peak_mb.items()}}
