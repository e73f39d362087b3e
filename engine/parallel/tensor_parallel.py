"""Tensor parallelism from the training shards themselves: one weight copy, nothing gathered to
generate.

`shard_tensor_parallel(model, T)` lays each sliced parameter out as a DTensor on the tensor
dimension of a (data x tensor) device mesh holding this rank's tensor-parallel slice: Shard(0) for
the column-parallel weights (packed q/k/v and gate/up, stored rank-interleaved by `interleave` so
that a rank's contiguous rows are its heads; the embedding and the LM head by vocabulary rows, the
last slice possibly shorter) and Shard(1) for the row-parallel ones (o_proj, down_proj). Norm
weights, the row-parallel biases and heads (a reward model's score) stay whole on every tensor rank:
they act on the replicated hidden states. So does a vision-language model's tower: every tensor rank
encodes the same images and places the same features in the replicated embeddings (with
train.train_vision its gradients are then the same on every rank). Across the data groups the
slices are either copies or, at train.data_parallel=shard, sharded further by FSDP2 over the data
dimension (the torch 2-D composition): a rank then keeps 1 / (T x D) of every weight, gradient and
optimizer state, and a layer's forward gathers only its tensor slices from the data group.

`TensorParallel.prims(base)` is the decoder walk's primitive set over the local tensor slices: a
column-parallel GEMM on the local rows, one all-reduce after o_proj and one after down_proj, a
vocabulary-parallel embedding (one all-reduce); copied slices are never gathered and their storage
never moves (the precondition of CUDA-graph replay), slices sharded over data are gathered by each
unit's FSDP hooks (in generation once for the rollout, by distributed.gathered). The collectives are
differentiable (ranks/tensor_parallel_ops.py), so the same walk trains: each rank's gradients
land on its own slices, averaged over the data groups by FSDP's reduce-scatter or, for copies, by
`average_over_data`, and the LM head's log-probs are vocabulary-parallel (model/lm_head.py).
`logits` gathers the vocabulary slices of the LM head's output, so the sampler draws from the whole
row, the same tokens on every tensor rank. SFT, RM, PPO and GRPO train tensor-parallel (in PPO a
tensor group is one data rank: TensorParallel.data_ranks), in full or with LoRA adapters sliced like
the weights they adapt (model/lora.py; the base then copied across data groups); what does not
refuses T > 1 in one line (engine/parallel/validate.py).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..model.causal_lm import CausalLM, PackedProjection, Projection
from ..model.primitives import composed_norm_linear
from . import distributed
from .dims import ParallelDims
from ..ranks.tensor_parallel_ops import from_ranks, to_ranks
from .validate import check_tensor_parallel


def interleave(model: nn.Module, t: int) -> None:
    """Reorder, in place (same storage), the rows of every packed projection's weight and bias into
    the rank-interleaved layout of T ranks (PackedProjection.row_blocks says which rows are
    whose)."""
    for proj in model.modules():
        if not isinstance(proj, PackedProjection) or proj.tensor_parallel == t:
            continue
        if proj.tensor_parallel != 1:
            raise ValueError(
                f"a projection already in a tensor_parallel={proj.tensor_parallel} layout")
        starts = [0]
        for _, size in proj.parts:
            starts.append(starts[-1] + size)
        # [out]
        order = torch.cat([torch.arange(start + r * size // t, start + (r + 1) * size // t)
                           for r in range(t) for (_, size), start in zip(proj.parts, starts)])
        with torch.no_grad():
            for param in (proj.weight, proj.bias):
                if param is not None:
                    param.copy_(param[order.to(param.device)].clone())
        proj.tensor_parallel = t


def _lay_out(model: nn.Module, tensor_mesh, row_parallel: set[int], sliced: set[int]) -> None:
    """Replace each sliced parameter of `model` by a DTensor on the tensor mesh holding this rank's
    slice: Shard(1) for the row-parallel weights, Shard(0) for the rest (DTensor's chunks: the last
    vocabulary slice may be shorter). Taken in place from the whole (or meta) value, no collective;
    a parameter held by two modules (tied embedding and LM head) stays one."""
    from torch.distributed.tensor import Shard, distribute_tensor
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in sliced:
                continue
            if id(param) not in made:
                dim = 1 if id(param) in row_parallel else 0
                local = distribute_tensor(param.detach(), tensor_mesh, [Shard(dim)],
                                          src_data_rank=None)
                made[id(param)] = nn.Parameter(local, requires_grad=param.requires_grad)
            setattr(module, name, made[id(param)])


def shard_tensor_parallel(model: CausalLM, dims: ParallelDims, data_shard: bool = False,
                          offload: bool = False) -> CausalLM:
    """Lay `model` out for the dims.tensor tensor ranks of dims.mesh(): every sliced weight a
    DTensor on the mesh's tensor dimension holding this rank's tensor slice (the module docstring),
    the rest whole. With `data_shard` and several data groups, FSDP2 then shards every unit over the
    data dimension (each decoder layer a unit and the rest the root, as distributed.shard): a rank
    keeps 1 / (T x D) of each weight, its gradient and optimizer state; a forward through the units'
    hooks gathers a layer's tensor slices from its data group (not the whole weight), and the
    backward reduce-scatters their gradients there. Without it the data groups hold copies of the
    slices. `offload` (train.optimizer_offload, train.frozen_offload; sharded over the data groups
    only, engine/parallel/validate.py): distributed.shard's CPU offload. Sets
    `model.tensor_parallel`.
    `model` is whole on every rank, or still on the meta device (hf_io.load_model's `shard`, each
    rank then reading only its slices)."""
    check_tensor_parallel(dims.tensor, dims.world, model.config)
    mesh = dims.mesh()
    interleave(model, dims.tensor)
    # The decoder only: a vision-language model's tower (`visual`) stays whole on every tensor rank
    # (Qwen3-VL's holds an nn.Embedding of patch positions, not a vocabulary).
    decoder = list(model.model.modules())
    rows = {id(m.weight) for m in decoder if type(m) is Projection}  # o_proj, down_proj
    sliced = {id(p) for m in decoder for p in m.parameters(recurse=False)
              if isinstance(m, (PackedProjection, nn.Embedding)) or id(p) in rows}
    sliced.add(id(model.lm_head.weight))
    # Whole on every rank: the norms, the row-parallel biases (added once, after the all-reduce),
    # any head (a reward model's score), which read the replicated hidden states, and the vision
    # tower, whose features every rank computes alike and places in the replicated embeddings.
    _lay_out(model, dims.sub("tensor"), rows, sliced)
    # context ranks: more data ranks to FSDP2
    data_sharded = data_shard and dims.data * dims.context > 1
    # FSDP2's units, as for one dimension (each decoder layer, the root), over the data one
    if data_sharded:
        distributed.shard(model, device_type=dims.device_type, offload=offload,
                          mesh=dims.sub("data"))
    model.tensor_parallel = TensorParallel(dims.sub("tensor").get_group(), dims.tensor,
                                           model.config.vocab_size, dims.sub("data").get_group(),
                                           data_sharded)
    return model


class TensorParallel:
    """One tensor group's collectives and the walk's primitives over the local shards; data_group:
    the ranks holding the same slices in the other data groups."""

    def __init__(self, group, size: int, vocab_size: int, data_group, data_sharded: bool = False):
        self.group, self.size = group, size
        self.data_group, self.data_size = data_group, dist.get_world_size(data_group)
        # FSDP2 over the data groups (shard_tensor_parallel's data_shard): its hooks gather each
        # layer's tensor slices and reduce-scatter their gradients; else the slices stay put.
        self.data_sharded = data_sharded
        self.rank = dist.get_rank(group)
        self.vocab_rows = -(-vocab_size // size)  # rows of every vocabulary slice but the last
        self.vocab_size = vocab_size

    def average_over_data(self, params) -> None:
        """Average the gradients of the sharded ones of `params` (the trained parameters: a model's,
        or LoRA adapters sliced like their base) over the data groups (FSDP's hooks, which would
        reduce them, are never entered), in fp32, one flat all-reduce. One data group, or FSDP over
        the data groups (which reduce-scattered them in the backward): nothing.
        The whole (replicated) parameters' gradients are
        distributed.average_replicated_gradients'."""
        from torch.distributed.tensor import DTensor
        grads = [p.grad.to_local() for p in params if isinstance(p.grad, DTensor)]
        if self.data_size == 1 or self.data_sharded or not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=self.data_group)
        flat /= self.data_size
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def data_ranks(self) -> distributed.DataRanks:
        """The ranks holding different rows where a tensor group is one data rank (PPO/GRPO)."""
        return distributed.DataRanks(self.size, self.data_group)

    def same_on_ranks(self, value):
        """The first tensor rank's `value` (picklable) on every rank of the group."""
        box = [value]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    def linear(self, x, weight, bias=None):
        """x [N, in or in / T] -> [N, out or out / T]: a plain GEMM for a whole weight, the local
        rows of a column-parallel one, or the local columns of a row-parallel one summed over the
        ranks (its bias, whole, added once after the sum)."""
        from torch.distributed.tensor import DTensor, Shard
        if not isinstance(weight, DTensor):
            return F.linear(x, weight, bias)
        if weight.placements[0] == Shard(1):
            y = from_ranks(F.linear(x, weight.to_local()), self.group)
            return y if bias is None else y + bias
        bias = bias.to_local() if isinstance(bias, DTensor) else bias
        return F.linear(to_ranks(x, self.group), weight.to_local(), bias)

    def embed(self, embedding: nn.Embedding, input_ids):
        """input_ids [N] -> [N, hidden]: each rank looks up the ids in its vocabulary slice (zeros
        elsewhere) and the rows are summed over the ranks (one all-reduce, exact: one term each)."""
        local = embedding.weight.to_local()  # [V / T, hidden]
        ids = input_ids - self.rank * self.vocab_rows
        inside = (ids >= 0) & (ids < local.shape[0])
        x = F.embedding(torch.where(inside, ids, 0), local) * inside.unsqueeze(-1).to(local.dtype)
        return from_ranks(x, self.group)

    def logits(self, lm_head: nn.Linear, hidden):
        """hidden [B, hidden] -> the whole logits [B, V], every rank's vocabulary slice gathered."""
        # [B, V / T] (the last slice maybe shorter)
        local = F.linear(hidden, lm_head.weight.to_local())
        padded = local.new_zeros(local.shape[0], self.vocab_rows)
        padded[:, :local.shape[1]] = local
        slices = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(slices, padded, group=self.group)
        return torch.cat(slices, dim=-1)[:, :self.vocab_size]

    def prims(self, base: SimpleNamespace) -> SimpleNamespace:
        """`base` (primitives.FORWARD or DECODE) over the local slices: this class's GEMM and
        embedding, each norm then its projection (a fused norm + GEMM kernel reads whole weights).
        Layers are entered as `base` enters them: copied slices have no hooks; slices sharded over
        the data groups are gathered by their units' FSDP hooks."""
        return SimpleNamespace(**{**vars(base), "linear": self.linear, "embed": self.embed,
                                  "norm_linear": composed_norm_linear})
