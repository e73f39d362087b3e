"""The paged KV pool of a PPO run, in the memory plan and at start-up, by one set of rules.

rollout.kv_cache_memory is bytes, a fraction of the GPU's memory, or `auto`: the largest pool that
fits beside everything else of every phase that holds it (all phases after load; the rollout alone
with rollout.release_kv_pool where no CUDA graph holds the pool), leaving AUTO_HEADROOM of the GPU
unplanned. Either way the engine never takes more than prompts_per_iteration x samples_per_prompt
full-length sequences (engine/inference/llm.py). The plan reports the pool as bytes, tokens and
full-length sequences at once; a pool that cannot hold one sequence does not fit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import UsageError
from ..inference.runner import kv_bytes_per_block
from .units import format_bytes

# Of the GPU's memory, what `auto` leaves out of the plan: the CUDA context, the caching allocator's
# fragmentation, NCCL's buffers (vLLM's gpu_memory_utilization 0.9 leaves as much).
AUTO_HEADROOM = 0.1
PHASES_AFTER_LOAD = ("rollout", "scoring", "update", "export")


@dataclass(frozen=True)
class PoolFigures:
    """A KV pool as the plan reports it: bytes per GPU, the tokens it holds (every layer's K and V
    of this GPU's heads), how many full-length sequences (max_prompt_length + max_new_tokens) fit at
    once, and the group size (samples_per_prompt) it is compared with."""
    bytes: int
    tokens: int
    sequences: int
    sequence_tokens: int
    group: int

    def as_dict(self) -> dict:
        return asdict(self)

    def problem(self) -> str | None:
        """Why the pool cannot run the rollout (it holds no full-length sequence), else None."""
        if self.sequences >= 1:
            return None
        return (f"the KV pool ({format_bytes(self.bytes)}, {self.tokens} tokens) does not hold one "
                f"full-length sequence of {self.sequence_tokens} tokens "
                "(rollout.max_prompt_length + rollout.max_new_tokens): raise "
                "rollout.kv_cache_memory (auto: the largest that fits) or free memory for it, or "
                "lower rollout.max_new_tokens")

    def warning(self) -> str | None:
        """A pool holding fewer sequences than one group: the group's samples decode in turns."""
        if 1 <= self.sequences < self.group:
            return (f"warning: the KV pool holds {self.sequences} full-length sequences at once, "
                    f"fewer than one group (rollout.samples_per_prompt={self.group}): long answers "
                    "decode in turns")
        return None

    def line(self) -> str:
        return (f"KV pool: {format_bytes(self.bytes)} per GPU = {self.tokens} tokens = "
                f"{self.sequences} full-length sequences ({self.sequence_tokens} tokens) at once")


def held_in(cfg, ranks: int, graphs_hold_pool: bool) -> tuple[str, ...]:
    """The phases that hold the pool: every phase after load, or the rollout alone with
    rollout.release_kv_pool where no CUDA graph holds the pool's addresses (graphs_hold_pool: one
    process, tensor slices read in place, rollout.persistent_weights)."""
    if cfg.rollout.release_kv_pool and not graphs_hold_pool:
        return ("rollout",)
    return PHASES_AFTER_LOAD


def pool_cap_blocks(cfg, max_model_len: int) -> int:
    """The engine's cap: max_num_seqs (RolloutConfig.max_rows) sequences of max_model_len tokens."""
    r = cfg.rollout
    return r.max_rows * -(-max_model_len // r.block_size)


def pool_bytes(cfg, model_config, dtype: torch.dtype, tensor_parallel: int, gpu_memory: int | None,
               phases: dict, held: tuple[str, ...]) -> int:
    """The pool's bytes per GPU in whole blocks, capped as the engine caps it:
    rollout.kv_cache_memory as bytes, as a fraction of `gpu_memory`, or auto: (1 - AUTO_HEADROOM)
    x gpu_memory less the largest of `phases` ({phase: {category: bytes}}, the pool left out)
    among those in `held`."""
    r = cfg.rollout
    per_block = kv_bytes_per_block(model_config, dtype, r.block_size, tensor_parallel)
    budget = r.kv_cache_memory
    if isinstance(budget, str) or isinstance(budget, float):
        if gpu_memory is None:
            raise ValueError(f"rollout.kv_cache_memory={budget!r} needs the GPU's memory to be "
                             "planned")
        if isinstance(budget, float):
            budget = int(budget * gpu_memory)
        else:
            others = max(sum(phases[name].values()) for name in held if name in phases)
            budget = max(int((1 - AUTO_HEADROOM) * gpu_memory) - others, 0)
    return min(budget // per_block, pool_cap_blocks(cfg, model_config.max_model_len)) * per_block


def pool_figures(cfg, model_config, dtype: torch.dtype, tensor_parallel: int,
                 nbytes: int) -> PoolFigures:
    """`nbytes` of pool per GPU as tokens and full-length sequences at once."""
    r = cfg.rollout
    per_block = kv_bytes_per_block(model_config, dtype, r.block_size, tensor_parallel)
    blocks = nbytes // per_block
    longest = min(r.max_prompt_length + r.max_new_tokens, model_config.max_model_len)
    return PoolFigures(nbytes, blocks * r.block_size, blocks // -(-longest // r.block_size),
                       longest, r.samples_per_prompt)


def fit_to_free(pool: PoolFigures, planned_peak: int, capacity: int) -> int:
    """The pool's bytes, less what the plan's peak exceeds the GPU's real `capacity` by (in whole
    sequences' worth of tokens: a pool is cut in blocks); UsageError where it then holds none."""
    short = max(planned_peak - capacity, 0)
    per_token = pool.bytes // max(pool.tokens, 1)
    tokens = pool.tokens - -(-short // max(per_token, 1)) if short else pool.tokens
    tokens = max(tokens, 0)
    fitted = PoolFigures(tokens * per_token, tokens, tokens // pool.sequence_tokens,
                         pool.sequence_tokens, pool.group)
    if fitted.problem():
        raise UsageError(f"{fitted.problem()} (the GPU has {format_bytes(capacity)} for this "
                         f"process; the plan needs {format_bytes(planned_peak)})")
    return fitted.bytes
