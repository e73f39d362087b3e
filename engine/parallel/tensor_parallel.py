"""Tensor parallelism from the training shards themselves: one weight copy, nothing gathered to generate.

`shard_tensor_parallel(model, T)` lays each sliced parameter out as a DTensor on the tensor
dimension of a (data x tensor) device mesh holding this rank's tensor-parallel slice: Shard(0) for
the column-parallel weights (packed q/k/v and gate/up, stored rank-interleaved by `interleave` so
that a rank's contiguous rows are its heads; the embedding and the LM head by vocabulary rows, the
last slice possibly shorter) and Shard(1) for the row-parallel ones (o_proj, down_proj). Norm
weights, the row-parallel biases and heads (a reward model's score) stay whole on every tensor rank:
they act on the replicated hidden states. Across the data groups the slices are either copies or,
at train.data_parallel=shard, sharded further by FSDP2 over the data dimension (the torch 2-D
composition): a rank then keeps 1 / (T x D) of every weight, gradient and optimizer state, and a
layer's forward gathers only its tensor slices from the data group.

`TensorParallel.prims(base)` is the decoder walk's primitive set over the local tensor slices: a
column-parallel GEMM on the local rows, one all-reduce after o_proj and one after down_proj, a
vocabulary-parallel embedding (one all-reduce); copied slices are never gathered and their storage
never moves (the precondition of CUDA-graph replay), slices sharded over data are gathered by each
unit's FSDP hooks (in generation once for the rollout, by distributed.gathered). The collectives are
differentiable (model/tensor_parallel_ops.py), so the same walk trains: each rank's gradients land
on its own slices, averaged over the data groups by FSDP's reduce-scatter or, for copies, by
`average_over_data`, and the LM head's log-probs are vocabulary-parallel (model/lm_head.py).
`logits` gathers the vocabulary slices of the LM head's output, so the sampler draws from the whole
row, the same tokens on every tensor rank. SFT, RM, PPO and GRPO train tensor-parallel (in PPO a
tensor group is one data rank: distributed.tensor_groups), in full or with LoRA adapters sliced like
the weights they adapt (model/lora.py; the base then copied across data groups); what does not yet
refuses T > 1 in one line (engine/plan/check.py).
"""
from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigValueError
from ..model.causal_lm import CausalLM, PackedProjection, Projection
from ..model.config import ModelConfig
from ..model.primitives import composed_norm_linear
from .tensor_parallel_ops import from_ranks, to_ranks


def fitting_sizes(world: int, config: ModelConfig) -> list[int]:
    """The tensor-parallel sizes T that divide the world size and the model's key/value heads."""
    return [t for t in range(1, world + 1) if world % t == 0 and config.num_kv_heads % t == 0
            and config.intermediate_size % t == 0 and config.vocab_size > (t - 1) * -(-config.vocab_size // t)]


def check_tensor_parallel(t: int, world: int, config: ModelConfig, option: str = "--tensor-parallel") -> None:
    """A one-line ConfigValueError unless T divides the world size, the key/value heads and the MLP
    width, and every tensor rank gets vocabulary rows."""
    if t not in fitting_sizes(world, config):
        raise ConfigValueError(
            f"{option}={t}: expected a size dividing the {world} ranks and this model's {config.num_kv_heads} "
            f"key/value heads (and its {config.intermediate_size} MLP features); these fit: "
            f"{fitting_sizes(world, config)}")


@functools.cache
def tensor_parallel_mesh(device_type: str, t: int):
    """The (data x tensor) device mesh of the job: world_size / T data groups of T tensor ranks, a
    tensor group being T consecutive ranks (one node's GPUs, where the all-reduces are cheap)."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (dist.get_world_size() // t, t), mesh_dim_names=("data", "tensor"))


def interleave(model: nn.Module, t: int) -> None:
    """Reorder, in place (same storage), the rows of every packed projection's weight and bias into
    the rank-interleaved layout of T ranks (PackedProjection.row_blocks says which rows are whose)."""
    for proj in model.modules():
        if not isinstance(proj, PackedProjection) or proj.tensor_parallel == t:
            continue
        if proj.tensor_parallel != 1:
            raise ValueError(f"a projection already in a tensor_parallel={proj.tensor_parallel} layout")
        starts = [0]
        for _, size in proj.parts:
            starts.append(starts[-1] + size)
        order = torch.cat([torch.arange(start + r * size // t, start + (r + 1) * size // t)
                           for r in range(t) for (_, size), start in zip(proj.parts, starts)])  # [out]
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
                local = distribute_tensor(param.detach(), tensor_mesh, [Shard(dim)], src_data_rank=None)
                made[id(param)] = nn.Parameter(local, requires_grad=param.requires_grad)
            setattr(module, name, made[id(param)])


def shard_tensor_parallel(model: CausalLM, t: int, option: str = "train.tensor_parallel",
                          device_type: str | None = None, data_shard: bool = False, offload: bool = False) -> CausalLM:
    """Lay `model` out for T tensor ranks: every sliced weight a DTensor on the mesh's tensor
    dimension holding this rank's tensor slice (the module docstring), the rest whole. With
    `data_shard` and several data groups, FSDP2 then shards every unit over the data dimension (each
    decoder layer a unit and the rest the root, as distributed.shard): a rank keeps 1 / (T x D) of
    each weight, its gradient and optimizer state; a forward through the units' hooks gathers a
    layer's tensor slices from its data group (not the whole weight), and the backward
    reduce-scatters their gradients there. Without it the data groups hold copies of the slices.
    `offload` (train.optimizer_offload, train.frozen_offload; sharded over the data groups only):
    distributed.shard's CPU offload. Sets `model.tensor_parallel`. `model` is whole on every rank, or
    still on the meta device (hf_io.load_model's `shard`, each rank then reading only its slices):
    `device_type` then names the device it will live on."""
    from . import distributed

    check_tensor_parallel(t, dist.get_world_size() if dist.is_initialized() else 1, model.config, option)
    mesh = tensor_parallel_mesh(device_type or next(model.parameters()).device.type, t)
    interleave(model, t)
    rows = {id(m.weight) for m in model.modules() if type(m) is Projection}  # o_proj, down_proj
    sliced = {id(p) for m in model.modules() for p in m.parameters(recurse=False)
              if isinstance(m, (PackedProjection, nn.Embedding)) or id(p) in rows}
    sliced.add(id(model.lm_head.weight))
    # Whole on every rank: the norms, the row-parallel biases (added once, after the all-reduce) and
    # any head (a reward model's score), which read the replicated hidden states.
    _lay_out(model, mesh["tensor"], rows, sliced)
    data_sharded = data_shard and mesh["data"].size() > 1
    if offload and not data_sharded:
        raise ConfigValueError(f"{option}={t}: offloading moves FSDP2's shards over the data groups to CPU memory; "
                               "expected the slices sharded over several data groups (train.data_parallel=shard)")
    if data_sharded:  # FSDP2's units, as for one dimension (each decoder layer, the root), over the data one
        distributed.shard(model, device_type=mesh.device_type, offload=offload, mesh=mesh["data"])
    model.tensor_parallel = TensorParallel(mesh["tensor"].get_group(), t, model.config.vocab_size,
                                           mesh["data"].get_group(), data_sharded)
    return model


def training_sharder(train, device, keep: Callable[[nn.Module], list] = lambda model: [],
                     data_shard: bool = True, offload: bool | None = None) -> Callable:
    """shard(model) for hf_io.load_model from a training config's `train` section: the tensor-parallel
    layout at train.tensor_parallel > 1 (sharded over the data groups too at train.data_parallel=shard,
    unless not `data_shard`: a LoRA base, whose adapters are sliced like its tensor slices), the experts
    sharded over expert groups at train.expert_parallel > 1
    (model/expert_parallel.shard_for_training), else distributed.sharder (FSDP2 over the data ranks in
    train.data_parallel's mode and train.shard_group_size, keeping whole the modules keep(model) names), offloaded
    to CPU memory with `offload` (default train.optimizer_offload: a trained model's)."""
    from . import distributed
    if getattr(train, "expert_parallel", 1) > 1:
        from .expert_parallel import shard_for_training
        device_type = torch.device(device).type
        return lambda model: shard_for_training(model, device_type, train.expert_parallel)
    offload = train.optimizer_offload if offload is None else offload
    if train.tensor_parallel > 1:
        device_type = torch.device(device).type
        return lambda model: shard_tensor_parallel(model, train.tensor_parallel, device_type=device_type,
                                                   data_shard=data_shard and train.data_parallel == "shard",
                                                   offload=offload)
    return distributed.sharder(train.data_parallel, device, keep, offload=offload,
                               group_size=train.shard_group_size)


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
        The whole (replicated) parameters' gradients are distributed.average_replicated_gradients'."""
        from torch.distributed.tensor import DTensor
        grads = [p.grad.to_local() for p in params if isinstance(p.grad, DTensor)]
        if self.data_size == 1 or self.data_sharded or not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=self.data_group)
        flat /= self.data_size
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

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
        local = F.linear(hidden, lm_head.weight.to_local())  # [B, V / T] (the last slice maybe shorter)
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


def generate_tensor_parallel(model_dir, prompts: list, params, t: int, *, device, dtype="auto", use_tqdm=False,
                             **llm_options) -> list | None:
    """`fusedrl generate --tensor-parallel T` under torchrun: the model loaded on every rank, laid out
    and sharded for T tensor ranks (shard_tensor_parallel), and the prompts cut in world_size / T
    contiguous shares, one per data group, each generated by its T ranks together. Returns every
    prompt's RequestOutput in order on the first rank, None on the others (collective)."""
    from pathlib import Path

    from . import distributed
    from ..inference.llm import LLM, directory_tokenizer
    from ..model.hf_io import load_config, load_model

    distributed.init_distributed(torch.device(device).type, timeout_s=600)
    world = distributed.world_size()
    if world == 1 or t < 1:
        raise ConfigValueError(f"--tensor-parallel {t}: expected a size dividing the number of ranks; run under "
                               f"torchrun --nproc-per-node N with N a multiple of {t}")
    check_tensor_parallel(t, world, load_config(model_dir))
    groups = world // t
    per_group = -(-len(prompts) // groups)
    share = prompts[distributed.rank() // t * per_group:][:per_group]
    device_type = torch.device(device).type
    model = load_model(model_dir, dtype=dtype, device=device,
                       shard=lambda m: shard_tensor_parallel(m, t, "--tensor-parallel", device_type))
    llm = LLM(model, tokenizer=directory_tokenizer(Path(model_dir)), **llm_options)
    outputs = llm.generate(share, params, use_tqdm=use_tqdm and distributed.is_main()) if share else []
    gathered = distributed.all_gather(outputs)
    return [out for group in range(groups) for out in gathered[group * t]] if distributed.is_main() else None
