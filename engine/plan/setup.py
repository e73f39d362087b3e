"""What the memory plan is computed from (`Setup`): the stage, its models built on the meta device
and its ParallelJob, and how each model lies on the ranks (sharded, sliced, expert-parallel,
offloaded), which every phase's figures (phases.py) read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config.parallel_job import ParallelJob
from .model_bytes import Part, local_numel, unique_params


@dataclass
class Setup:
    """What the plan is computed from: the stage, its config, its models (built on meta), the
    ranks."""
    stage: str
    cfg: object
    job: ParallelJob            # what the stage's config says of the layout
    parts: list[Part]
    ranks: int
    shard_group: int            # ranks an FSDP model is split over (distributed.shard_group_size)
    dtype: torch.dtype          # of the models' parameters (train.precision)
    offload_optimizer: bool
    gpu_memory: int | None = None  # what rollout.kv_cache_memory's fraction or `auto` is of
    # parameter lists and unit sizes, computed once
    memo: dict = field(default_factory=dict, repr=False)
    fused: bool = True          # the decoder's fused kernels run (CUDA), else its torch ops

    def once(self, key, compute):
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def fsdp(self, part: Part) -> bool:
        """An FSDP2 model: shard() wraps it under torchrun (in replicate mode its units still
        gather)."""
        return part.sharded and self.ranks > 1

    def shards(self, part: Part) -> int:
        """The ranks its parameters, gradients and optimizer state are split over: the shard group
        of train.data_parallel (every GPU: shard; train.shard_group_size, one node's by default:
        hybrid; 1, whole copies: replicate); at train.tensor_parallel T > 1 every GPU where the data
        groups shard the tensor slices too (data_sharded), else the T ranks of a tensor group (the
        data groups hold copies: engine/parallel/tensor_parallel.py); 1 for a model every GPU holds
        whole."""
        if not self.fsdp(part):
            return 1
        if self.job.train.tensor_parallel == 1:
            return self.shard_group
        return self.ranks if self.data_sharded(part) else self.job.train.tensor_parallel

    def data_sharded(self, part: Part) -> bool:
        """At T > 1 on more than T GPUs at train.data_parallel=shard, FSDP2 shards its tensor slices
        over the data groups (engine/parallel/tensor_parallel.py); not a LoRA base's, nor the shared
        value head."""
        t = self.job.train.tensor_parallel
        return (t > 1 and self.ranks > t and self.fsdp(part) and self.job.train.data_parallel ==
                "shard"
                and not part.adapted and part.role != "value head")

    def gathered_share(self, part: Part) -> int:
        """A unit's gathered weights are 1 / this of it (T > 1: its tensor slices, when sharded over
        the data groups); 0 where nothing is gathered (a model whole on every GPU; slices read in
        place)."""
        if (not self.fsdp(part)
            or (self.job.train.tensor_parallel > 1 and not self.data_sharded(part))):
            return 0
        return self.job.train.tensor_parallel

    def slice_bytes(self, part: Part) -> int:
        """A GPU's tensor slice of `part`: 1 / T of its weights."""
        return sum(self.local_numel(p, self.job.train.tensor_parallel) * p.element_size()
                   for p in unique_params(part.module))

    @property
    def experts(self) -> tuple[int, set[int]]:
        """(E, ids of the parameters expert parallelism holds): at train.expert_parallel=E > 1 under
        torchrun the trained policy's (SFT's model's) experts, E / num_experts of them whole per
        rank and outside FSDP's units (engine/parallel/expert_parallel.py); (1, empty) otherwise."""
        def compute():
            e = self.job.train.expert_parallel
            if e == 1 or self.ranks == 1:
                return 1, set()
            return e, {id(p) for part in self.parts
                       if part.role in ("policy", "model") and part.trained
                       for name, p in part.module.named_parameters() if ".experts." in name}
        return self.once("experts", compute)

    @property
    def whole_on_tensor_ranks(self) -> set[int]:
        """ids of the parameters every tensor rank holds whole at train.tensor_parallel > 1: a
        vision-language model's tower (engine/parallel/tensor_parallel.py slices the decoder
        only)."""
        return self.once("tower", lambda: {
            id(p) for part in self.parts
            for name, p in part.module.named_parameters() if name.startswith("visual.")})

    def local_numel(self, p: torch.Tensor, shards: int) -> int:
        """Elements of `p` on rank 0 of `shards` (Setup.shards): an expert-parallel parameter's 1/E;
        a vision tower's at T > 1 split over the data groups only (shards / T); else
        model_bytes.local_numel."""
        e, ids = self.experts
        if id(p) in ids:
            return p.numel() // e
        t = self.job.train.tensor_parallel
        if t > 1 and shards >= t and id(p) in self.whole_on_tensor_ranks:
            shards //= t
        return local_numel(p, shards)

    def offloaded(self, part: Part) -> bool:
        """Its shards rest in CPU memory (distributed.shard's CPUOffloadPolicy), as build_models
        decides: with train.optimizer_offload a trained FSDP2 model (parameters, gradients,
        optimizer state; adapters stay on the GPU), with train.frozen_offload the frozen ones."""
        if (not self.fsdp(part)
            or (self.job.train.tensor_parallel > 1 and not self.data_sharded(part))):
            return False
        if part.trained:
            return self.offload_optimizer
        # train.frozen_offload (PPO): the reference (distill: the teacher) and the reward model
        # (unless the LoRA critic's trunk).
        frozen = part.role in ("reference", "teacher") or (part.role == "reward model" and
                                              not any(p.role == "critic adapters"
                                                      for p in self.parts))
        return frozen and self.job.train.frozen_offload
