"""The sparse mixture-of-experts block of Qwen3-MoE and Mixtral layers, and its routing trace.

`SparseMoeBlock(h)`: the router (a linear layer, softmax or sigmoid scores in fp32, top-k,
renormalized over the k when the config says so) picks each token's experts; the tokens' rows are
sorted by expert (kernels.moe_sort, moe_permute), the experts run as two grouped GEMMs over all of
them (kernels.grouped_linear: gate/up [E, 2I, H], then SiLU * up as in the dense MLP, then down [E,
H, I]) and kernels.moe_unpermute sums each token's k outputs weighted by its routing weights. No
loop over experts and no host read: a decode step keeps its shapes whatever the routing.

Parameter names are transformers 5's (`mlp.gate.weight`, `mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`); hf_io maps them to the per-expert layout of checkpoints (weight_map.py).

`routing_trace(model, replay=...)` lets a caller see and steer the routing of the forwards under it:
each block records its layer's choices and router logits (for the auxiliary losses) and, where a
replay tensor gives a token's experts, uses those instead of its own top-k (routing replay).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ... import kernels
from .moe_config import MoEConfig


class Router(nn.Module):
    """The router's linear layer (`gate`, no bias): weight [E, H]."""

    def __init__(self, num_experts: int, hidden_size: int, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype))


class Experts(nn.Module):
    """Every expert's SwiGLU weights stacked: gate_up_proj [E, 2I, H] (gate rows then up rows, as
    the dense MLP's packed projection), down_proj [E, H, I]."""

    def __init__(self, moe: MoEConfig, hidden_size: int, dtype):
        super().__init__()
        e, i = moe.num_experts, moe.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, hidden_size, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(e, hidden_size, i, dtype=dtype))


@dataclass
class RoutingTrace:
    """What the MoE blocks of a model saw under `routing_trace`, by layer index: `chosen` [N, k]
    int64 experts of each token, `logits` [N, E] the router's logits (differentiable, for the
    auxiliary losses). `replay`: layer -> [N, k] experts to use instead of the router's top-k,
    -1 where a token has none recorded (it routes itself). `out` [sparse layers, rows, k]: a
    buffer each block also copies its choices into (rows 0..N-1 of its sparse index), the one
    record a captured CUDA graph can write."""

    replay: dict[int, torch.Tensor] | None = None
    out: torch.Tensor | None = None
    chosen: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)


class SparseMoeBlock(nn.Module):
    """The MLP of a sparse layer: hidden [N, H] -> [N, H]."""

    def __init__(self, moe: MoEConfig, hidden_size: int, dtype, layer_idx: int):
        super().__init__()
        self.moe, self.layer_idx = moe, layer_idx
        self.sparse_index = moe.sparse_layers.index(layer_idx)  # its row in routing records
        self.gate = Router(moe.num_experts, hidden_size, dtype)
        self.experts = Experts(moe, hidden_size, dtype)
        self.trace: RoutingTrace | None = None  # set by routing_trace for the forwards under it
        # expert_parallel.shard_experts: this rank's experts of a process group
        self.expert_shard = None
        # a fixed-capacity expert-parallel forward's dropped assignments [] (its latest forward's)
        self.dropped: torch.Tensor | None = None

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [N, E] -> (experts [N, k] int64, weights [N, k]): the scores in fp32
        (router_scores), top-k (or the trace's replayed experts), renormalized over the k when
        norm_topk_prob.

        Softmax scores renormalized over the k are the softmax of the k logits themselves
        (exp(l_i) / the k's sum of exp(l_j)), and the logits rank the experts as their softmax
        does: so that case takes the top k of the fp32 logits and a k-wide softmax, no softmax over
        every expert, no sum and division (a Qwen3-MoE layer forward and backward: 61 -> 52
        launches, bench/results/launches.md)."""
        top_k_softmax = self.moe.norm_topk_prob and self.moe.scoring_func == "softmax"
        scores = logits.float() if top_k_softmax else router_scores(logits,
                                                                     self.moe.scoring_func)
        weights, ids = torch.topk(scores, self.moe.top_k, dim=-1)
        replay = self.trace.replay.get(self.layer_idx) if self.trace and self.trace.replay else None
        if replay is not None:
            if replay.shape != ids.shape:
                raise ValueError(
                    f"routing replay of layer {self.layer_idx} is {tuple(replay.shape)}: expected "
                    f"{tuple(ids.shape)} (tokens, top_k)")
            ids = torch.where(replay >= 0, replay.to(ids.device), ids)
            weights = scores.gather(1, ids)
        if top_k_softmax:
            weights = torch.softmax(weights, dim=-1)
        elif self.moe.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights if self.moe.fp32_weights else weights.to(logits.dtype)

    def forward(self, h: torch.Tensor, prims) -> torch.Tensor:
        """h [N, H] (the post-attention norm's output) -> the experts' weighted sum [N, H]; prims:
        the walk's primitive set (the router's GEMM and SiLU * up come from it)."""
        h = h.contiguous()
        logits = prims.linear(h, self.gate.weight, None)  # [N, E]
        ids, weights = self.route(logits)
        if self.trace is not None:
            self.trace.chosen[self.layer_idx] = ids.detach()
            self.trace.logits[self.layer_idx] = logits
            if self.trace.out is not None:
                self.trace.out[self.sparse_index, :ids.shape[0]].copy_(ids)
        if self.expert_shard is not None:
            return self.expert_shard.dispatch(self, h, ids, weights, prims)
        order, slot_rows, offsets = kernels.moe_sort(ids, self.moe.num_experts)
        rows = kernels.moe_permute(h, order, self.moe.top_k)  # [N*k, H] sorted by expert
        gate_up = kernels.grouped_linear(rows, self.experts.gate_up_proj, offsets)  # [N*k, 2I]
        # [N*k, H]
        out = kernels.grouped_linear(prims.silu_mul(gate_up), self.experts.down_proj, offsets)
        return kernels.moe_unpermute(out, order, slot_rows, weights)


def router_scores(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Router logits [N, E] -> scores [N, E] in fp32, what top-k ranks and the weights are read
    from: softmax over the experts, or each logit's sigmoid (DeepSeek's routers: an expert's score
    does not depend on the others')."""
    if scoring_func == "sigmoid":
        return torch.sigmoid(logits.float())
    return torch.softmax(logits.float(), dim=-1)


def balance_probs(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Router logits [N, E] -> each token's distribution over the experts [N, E] fp32 that the
    load-balancing loss averages: the softmax, or the sigmoid scores normalized to sum to 1
    (DeepSeek-V3's P_i)."""
    scores = router_scores(logits, scoring_func)
    return scores if scoring_func == "softmax" else scores / scores.sum(dim=-1, keepdim=True)


def moe_blocks(model: nn.Module) -> list[SparseMoeBlock]:
    """The model's MoE blocks in layer order (none for a dense model)."""
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def replay_of(model: nn.Module, routing: torch.Tensor) -> dict[int, torch.Tensor]:
    """A routing record [N, sparse layers, k] (the sampler's, int16, -1 where none) -> the replay
    argument of routing_trace: layer index -> [N, k] int64."""
    return {block.layer_idx: routing[:, block.sparse_index].long() for block in moe_blocks(model)}


def agree_buffers(model: nn.Module, tokens: int, device) -> None:
    """Before a forward of `tokens` rows: a fixed-capacity expert-parallel model's ranks agree on
    their buffers' size (expert_parallel.Capacity: one host read a forward, none per layer)."""
    capacity = _capacity(moe_blocks(model))
    if capacity is not None:
        capacity.agree(tokens, device)


def dropped_assignments(model: nn.Module) -> torch.Tensor | None:
    """The (token, expert) assignments the latest forward of a fixed-capacity expert-parallel
    `model` dropped, over its sparse layers ([] on the device); None without that layout."""
    counts = [b.dropped for b in moe_blocks(model) if b.dropped is not None]
    return torch.stack(counts).sum() if counts else None


def trace_restorer(model: nn.Module):
    """A factory of contexts that attach the trace active now (or none) to the model's MoE blocks
    and size their fixed-capacity buffers as now: a layer recomputed in backward, after
    routing_trace has exited, routes and exchanges as its forward did."""
    blocks = moe_blocks(model)
    trace = blocks[0].trace if blocks else None
    capacity = _capacity(blocks)
    rows = capacity.rows if capacity is not None else 0
    return lambda: _attached(blocks, trace, capacity, rows)


def _capacity(blocks: list[SparseMoeBlock]):
    """The blocks' shared expert_parallel.Capacity, or None (variable splits, no sharding)."""
    shard = next((b.expert_shard for b in blocks if b.expert_shard is not None), None)
    return shard.capacity if shard is not None else None


@contextlib.contextmanager
def _attached(blocks: list[SparseMoeBlock], trace: RoutingTrace | None, capacity=None,
              rows: int = 0):
    before = [block.trace for block in blocks]
    kept = capacity.rows if capacity is not None else 0
    for block in blocks:
        block.trace = trace
    if capacity is not None:
        capacity.rows = rows
    try:
        yield
    finally:
        for block, old in zip(blocks, before):
            block.trace = old
        if capacity is not None:
            capacity.rows = kept


@contextlib.contextmanager
def routing_trace(model: nn.Module, replay: dict[int, torch.Tensor] | None = None,
                  out: torch.Tensor | None = None) -> Iterator[RoutingTrace]:
    """Record (and with `replay`, steer) the routing of every forward of `model` under this context,
    backward recomputations included (a checkpointed layer replays the same experts); `out`: see
    RoutingTrace. Inside another trace, this one records into the enclosing one's `chosen` and
    `logits` too (a loss reading the router logits around a forward that replays)."""
    blocks = moe_blocks(model)
    outer = blocks[0].trace if blocks else None
    trace = RoutingTrace(replay=replay, out=out) if outer is None else RoutingTrace(
        replay if replay is not None else outer.replay, out if out is not None else outer.out,
        outer.chosen, outer.logits)
    with _attached(blocks, trace):
        yield trace
