"""MemoryPlan: what `fusedrl plan` says of a stage: the bytes per GPU of every phase by category,
the models, the KV pool, and whether it fits."""
from __future__ import annotations

from dataclasses import dataclass, field

from .kv_pool import PoolFigures


@dataclass
class MemoryPlan:
    stage: str
    ranks: int
    gpu_memory: int
    phases: dict                 # {phase: {category: bytes per GPU}}
    models: list                 # [{role, parameters, bytes, sharded, trained_parameters}]
    host_optimizer_bytes: int    # per rank, when the optimizer state is offloaded
    notes: list = field(default_factory=list)
    shard_group: int = 1         # GPUs an FSDP model is split over (Setup.shard_group)
    kv_pool: PoolFigures | None = None  # PPO: the rollout's KV pool (kv_pool.py)
    checkpointing: bool = False  # layer recompute as planned (gradient_checkpointing resolved)

    def total(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)

    @property
    def peak(self) -> int:
        return self.total(self.peak_phase)

    @property
    def fits(self) -> bool:
        """Every phase within the GPU, and a KV pool that holds one full-length sequence."""
        pool_ok = self.kv_pool is None or self.kv_pool.problem() is None
        return self.peak <= self.gpu_memory and pool_ok
