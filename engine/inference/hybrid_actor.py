"""The hybrid actor: one set of policy weights that the paged-KV engine generates from and the
trainer updates, with no weight copy and no sync step.

The engine holds the policy module itself; optimizer steps update its parameters in place, so
every rollout samples from the current weights (CUDA graphs captured by the engine keep pointing
at the same storage). The KV pool is allocated once at `rollout.kv_cache_memory` bytes and kept
through training: its size is a stated budget, not a surprise. With rollout.release_kv_pool it is
freed after each rollout (scoring and the update can use its memory) and allocated again by the
next one, where CUDA graphs allow: a captured decode step holds the pool's addresses, so with
graphs (one process on CUDA) the pool stays; without them (under torchrun, on the CPU) it goes.

Under torchrun (the policy sharded by FSDP2) each rank generates its own share of the prompts from
the whole parameters: `run` gathers them (`unshard()`) before the rollout and frees them
(`reshard()`) after, so a rank holds one whole copy of the policy's parameters only while it
generates (on top of its shard), and its forwards inside issue no collective, whatever its number
of decode steps. The KV pool is per rank. CUDA graphs are off there: the gathered parameters are
reallocated at every unshard, and a captured graph would read freed memory. With
persistent_weights (rollout.persistent_weights) the whole parameters are instead buffers allocated
once and refilled in place before each rollout (persistent_weights.py): one whole copy of the
policy (of its tensor slice) kept per rank through training, and CUDA graphs on. A policy sharded
tensor-parallel (engine/parallel/tensor_parallel.py) is not gathered: each rank generates with its
tensor group from its own slices, whose storage never moves, so CUDA graphs stay on there; unless
FSDP shards the slices over the data groups too (train.data_parallel=shard), then gathered from the
data group for the rollout (1 / T of the policy per rank, not the whole), CUDA graphs off but with
persistent_weights.
"""
from __future__ import annotations

import contextlib

import torch

from ..parallel.validate import check_persistent_weights
from .llm import LLM
from ..parallel.persistent_weights import PersistentWeights
from .runner import kv_bytes_per_block
from ..model.causal_lm import CausalLM
from ..parallel.expert_parallel import gathered_experts
from ..model.invariant import BatchInvariant
from ..parallel import distributed
from .request import Request
from .sequence import routing_rows


class HybridActor:
    def __init__(self, policy: CausalLM, tokenizer=None, *, kv_cache_memory: int,
                 block_size: int = 16, max_num_seqs: int = 256, use_cuda_graphs: bool = True,
                 batch_invariant: bool = False, device=None, release_kv_pool: bool = False,
                 record_routing: bool = False, persistent_weights: bool = False,
                 speculative_tokens: int = 0, speculate_below: int = 8,
                 prefill_chunk: int | None = None, overlap_decode: bool | None = None):
        """record_routing: keep an MoE policy's expert choices of every rollout token
        (`last_routing`). persistent_weights: generate from whole-size buffers refilled in place
        (under torchrun, where the policy is gathered: at tensor_parallel 1, or its tensor slices
        sharded over the data groups; collective: every rank builds its actor together).
        overlap_decode: LLM's (decode steps launched ahead; None: on a GPU)."""
        self.policy = policy
        self.release_kv_pool = release_kv_pool
        tp = policy.tensor_parallel
        # Tensor slices sharded over the data groups are gathered for each rollout, as FSDP units
        # are.
        alone = distributed.world_size() == 1
        gathers = not alone and (tp is None or tp.data_sharded)
        if persistent_weights:
            check_persistent_weights(alone, gathers)
        self.weights = PersistentWeights(policy, device) if persistent_weights else None
        # Nothing gathered, or gathered into storage that stays put: captured graphs stay valid.
        graphs = not gathers or self.weights is not None
        # capture on the buffers
        with self.whole_weights() if self.weights is not None else contextlib.nullcontext():
            self.llm = LLM(policy, tokenizer=tokenizer, kv_cache_memory=kv_cache_memory,
                           block_size=block_size, device=device, max_num_seqs=max_num_seqs,
                           use_cuda_graphs=use_cuda_graphs and graphs,
                           batch_invariant=batch_invariant, record_routing=record_routing,
                           speculative_tokens=speculative_tokens, speculate_below=speculate_below,
                           prefill_chunk=prefill_chunk, overlap_decode=overlap_decode)
        self.record_routing = record_routing
        # The last rollout's routing records [sum of prompt + response lengths, sparse layers, k],
        # rows as pack_rollout packs them (None without record_routing).
        self.last_routing = None

    @contextlib.contextmanager
    def whole_weights(self):
        """Inside: the policy's walk reads weights a rank (its tensor group) runs forwards on alone
        (collective on entry): the persistent buffers refilled, or its FSDP units (tensor-parallel:
        their slices, from the data group; copied slices: none) and experts gathered. Generation
        runs in it, and rollout.exact's old-log-prob forward (stages/ppo/forwards.py)."""
        if self.weights is not None:
            with self.weights.active():
                yield
        else:
            with distributed.gathered(self.policy), gathered_experts(self.policy):
                yield

    @property
    def batch_invariant(self) -> BatchInvariant | None:
        """The engine's batch-invariant mode (None when off): the trainer's old-log-prob forward
        runs in it to reproduce the sampler's log-probs bit for bit."""
        return self.llm.batch_invariant

    @property
    def kv_pool_bytes(self) -> int:
        runner = self.llm.runner
        return kv_bytes_per_block(runner.config, runner.dtype,
                                  runner.block_size) * runner.num_blocks

    @torch.no_grad()
    def run(self, requests: list[Request], stop=None, on_end=None) -> list:
        """LLM.run from the current weights (the engine's one loop: `stop` and `on_end` as there);
        with record_routing `last_routing` holds each sequence's records, row after row."""
        with self.whole_weights():
            seqs = self.llm.run(requests, stop, on_end)
        self._after_rollout([routing_rows(seq) for seq in seqs])
        return seqs

    @property
    def device(self) -> torch.device:
        """Where the policy runs, its rollouts' log-probs lie (its resting shards may be on CPU)."""
        return self.llm.device

    @property
    def max_model_len(self) -> int:
        """The policy's context length: no sequence it generates is longer."""
        return self.llm.config.max_model_len

    def device_logprobs(self, slots: list[int]) -> torch.Tensor:
        """The last rollout's sampled log-probs at these slots (its sequences' logprob_slots), one
        fp32 tensor [len(slots)] on `device` (LLM.device_logprobs)."""
        return self.llm.device_logprobs(slots)

    def take_speculation(self) -> dict:
        """{"drafted", "accepted"}: speculative decoding's draft tokens since the last call
        (LLM.take_speculation)."""
        return self.llm.take_speculation()

    def _after_rollout(self, routing_rows: list[list[int]]) -> None:
        """Every rollout's end, whichever way it generated: with record_routing `last_routing`
        holds its rows' records [sum of the rows' whole lengths, sparse layers, k] int16 on the
        device, row after row, as pack_rollout packs them; the pool released
        (rollout.release_kv_pool: its memory for scoring and the update)."""
        if self.record_routing:
            self.last_routing = self.llm.device_routing([r for rows in routing_rows for r in rows])
        if self.release_kv_pool:
            self.llm.runner.release_kv_pool()
