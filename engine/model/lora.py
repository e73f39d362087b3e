"""LoRA adapters on the one weight copy of a CausalLM (or a model built on it: reward, value).

The adapters live in their own module (`LoRA`), outside the model's parameters, so the model's
state dict, its Hugging Face export and its frozen weights stay the base model's. Each adapted
projection gets a forward hook that adds the low-rank term, so every path that calls the projection
applies it: the training forward and backward, the scoring forwards and the paged decode step (a
CUDA graph captures the hook's GEMMs; the optimizer updates the adapters in place, so the graph
stays valid). The adapters' GEMMs come from the walk's primitive set, as the projection's own
(`prims.linear`: torch's in the default walk, the fixed-tile one in the batch-invariant mode), and
the rest of their term is elementwise, so an adapted model stays batch-invariant in that mode
(rollout.exact). A packed projection (q/k/v in one nn.Linear, gate/up in one) gets one A/B pair per
target, whose output lands in that target's slice of the packed output, as separate PEFT modules
would give.

On a tensor-parallel base (engine/parallel/tensor_parallel.py) the adapters are laid out like the
weight they adapt, so the walk's own GEMM (`TensorParallel.linear`) runs them on the local slices
and the result is one process's exactly: on a column-parallel projection (Shard(0): q/k/v, gate/up)
each B is sliced by rows, a rank's rows of its target (its heads, its MLP features), and A is whole:
y_l += s * to_ranks(x A^T) B_l^T, whose backward sums A's input gradient over the ranks, so A's
gradient is whole and the same on every rank. On a row-parallel one (Shard(1): o_proj, down_proj)
each A is sliced by columns, the rank's slice of the input, and B is whole:
y += s * from_ranks(x_l A_l^T) B^T. The sliced ones are DTensors on the tensor ranks (their
gradients averaged over the data groups like the base's: TensorParallel.average_over_data), the
whole ones plain tensors (distributed.average_replicated_gradients). Each target's B (or A) is
sliced on its own, so a sliced adapter's whole value (`DTensor.full_tensor`) is PEFT's tensor: no
rank-interleaved rows.

A head trained in full beside the adapters (the reward model's `score`, the LoRA critic's value
head) is one of `LoRA.heads`, PEFT's `modules_to_save`: its parameters are the model's own (trained
in place, so the model's export already holds it), and it is saved with the adapters.

`LoRA.enabled` is the one flag the hooks read: the reference policy is the same model with it off
(`with lora.disabled(): ...`), no second copy of the weights. With B = 0 (a fresh adapter) the
forward is the base model's bit for bit (y + 0 == y).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ranks import sharded
from ..config.lora import LoRAConfig
from .weight_map import add_rows


def output_slices(name: str, linear: nn.Linear) -> dict[str, slice]:
    """{Hugging Face projection: its slice of `linear`'s output} for the projection module `name`:
    one slice for a plain projection, one per part of a packed one (its `parts`, in output
    order)."""
    slices, start = {}, 0
    for part, size in getattr(linear, "parts", ((name, linear.out_features),)):
        slices[part] = slice(start, start + size)
        start += size
    return slices


class ProjectionAdapters(nn.Module):
    """The low-rank pairs of one projection (an nn.Linear [out, in]): for each adapted target t,
    lora_A[t] [rank, in] and lora_B[t] [size_t, rank], adding scale * B_t A_t dropout(x) to the
    output slice of t (PEFT's init: A Kaiming-uniform, B zero)."""

    def __init__(self, linear: nn.Linear, slices: dict[str, slice], cfg: LoRAConfig):
        super().__init__()
        self.out_features = linear.out_features
        self.scale, self.dropout = cfg.alpha / cfg.rank, cfg.dropout
        self.shards = 1  # tensor ranks the output is sliced over (slice_like_base)
        self.slices = dict(sorted(slices.items(), key=lambda item: item[1].start))
        like = dict(dtype=linear.weight.dtype, device=linear.weight.device)
        self.lora_A = nn.ParameterDict(
            {t: nn.Parameter(torch.empty(cfg.rank, linear.in_features, **like))
             for t in self.slices})
        self.lora_B = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(s.stop - s.start, cfg.rank, **like))
             for t, s in self.slices.items()})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, training: bool, linear=F.linear) -> torch.Tensor:
        """x [..., in] -> the adapters' term [..., out] (zeros in the slices of unadapted targets);
        linear(x [N, K], weight [O, K]) -> [N, O]: the GEMM to use (the walk's primitive). On a
        column-parallel base sliced over `shards` ranks, x [..., in] -> [..., out / shards], this
        rank's slice of each target in turn, as the base's local output."""
        pieces, at = [], 0
        for t, s in self.slices.items():
            if s.start > at:
                pieces.append(x.new_zeros(*x.shape[:-1], (s.start - at) // self.shards))
            # a mask per target, as PEFT
            h = F.dropout(x, self.dropout, training) if self.dropout else x
            pieces.append(linear(linear(h, self.lora_A[t]), self.lora_B[t]) * self.scale)
            at = s.stop
        if at < self.out_features:
            pieces.append(x.new_zeros(*x.shape[:-1], (self.out_features - at) // self.shards))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def merge_into(self, linear: nn.Linear) -> None:
        """W[rows of t] += scale * B_t @ A_t, computed in fp64 and rounded once into W's dtype, so
        that a merge on the GPU (a run's) and on the CPU (`fusedrl export --merge`) give the same
        bits (fp32 GEMMs round differently there); on a sharded W each rank adds into its own shard
        (the whole adapters: gathered when sliced, collective), at the rows `row_blocks` gives t in
        W's layout (rank-interleaved when packed for tensor ranks)."""
        for t, s in self.slices.items():
            # gathered when sliced
            b, a = (sharded.whole_value(p).double() for p in (self.lora_B[t], self.lora_A[t]))
            delta = b @ a * self.scale  # [size_t, in]
            blocks = (linear.row_blocks() if hasattr(linear, "row_blocks")
                      else [(t, s.start, 0, delta.shape[0])])
            for part, row, part_row, rows in blocks:
                if part == t:
                    add_rows(linear.weight, row, delta[part_row:part_row + rows])

    def slice_like_base(self, linear: nn.Linear) -> None:
        """Lay the adapters out like `linear`'s tensor-parallel weight (the module docstring): each
        B by rows beside a Shard(0) weight, each A by columns beside a Shard(1) one, as DTensors on
        the weight's tensor ranks, each rank keeping its slice of the whole value it holds. A whole
        weight keeps whole adapters."""
        from torch.distributed.tensor import Shard, distribute_tensor
        weight = linear.weight
        if not hasattr(weight, "placements"):
            return
        dim = weight.placements[0].dim
        sliced = self.lora_B if dim == 0 else self.lora_A
        for t, param in sliced.items():
            sliced[t] = nn.Parameter(
                distribute_tensor(param.detach(), weight.device_mesh, [Shard(dim)],
                                  src_data_rank=None))  # no copy between the ranks
        if dim == 0:
            self.shards = weight.device_mesh.size()


def projections(model: nn.Module):
    """(module path, projection name, nn.Linear) of every projection of attention and MLP, with
    paths as in the Hugging Face checkpoint (model.layers.0.self_attn.q_proj)."""
    for i, layer in enumerate(model.model.layers):
        for block in ("self_attn", "mlp"):
            for name, child in getattr(layer, block).named_children():
                if isinstance(child, nn.Linear):
                    yield f"model.layers.{i}.{block}", name, child


class LoRA(nn.Module):
    """The adapters of one model, attached by forward hooks; build with `add_lora`.

    `paths[i]` is the Hugging Face path of `adapters[i]`'s projection module ("model.layers.0.mlp");
    `heads`: {PEFT module name: head trained in full} (PEFT's modules_to_save, e.g. {"score": ...});
    `enabled` is read by every hook at each forward."""

    def __init__(self, model: nn.Module, cfg: LoRAConfig,
                 heads: dict[str, nn.Module] | None = None):
        super().__init__()
        self.config, self.enabled = cfg, True
        self.heads = nn.ModuleDict(heads or {})
        self.paths: list[str] = []
        self.adapters = nn.ModuleList()
        # plain lists: the base modules are the model's, not ours
        self._hooks, self._linears = [], []
        for parent, name, linear in projections(model):
            slices = {t: s for t, s in output_slices(name, linear).items() if t in cfg.targets}
            if not slices:
                continue
            adapters = ProjectionAdapters(linear, slices, cfg)
            if model.tensor_parallel is not None:
                adapters.slice_like_base(linear)
            self.paths.append(parent)
            self.adapters.append(adapters)
            self._linears.append(linear)
            self._hooks.append(linear.register_forward_hook(self._hook(adapters)))

    def _hook(self, adapters: ProjectionAdapters):
        def add_low_rank(linear, args, output):  # args: the Projection's (x, prims)
            if not self.enabled:
                return output
            x, prims = args
            return output + adapters(x, linear.training, prims.linear)
        return add_low_rank

    @contextlib.contextmanager
    def disabled(self):
        """The base model inside the block (the reference policy): the hooks add nothing."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def named_targets(self):
        """(Hugging Face module path of the target, e.g. model.layers.0.self_attn.q_proj, its A, its
        B)."""
        for parent, adapters in zip(self.paths, self.adapters):
            for t in adapters.slices:
                yield f"{parent}.{t}", adapters.lora_A[t], adapters.lora_B[t]

    def merge_(self) -> None:
        """Fold the adapters into the base weights in place and detach them: the model is then the
        merged model (for export) and no longer adapted. On a sharded base each rank merges into
        its own shards (the base must be resharded: distributed.reshard)."""
        for adapters, linear, hook in zip(self.adapters, self._linears, self._hooks):
            adapters.merge_into(linear)
            hook.remove()
        self._hooks = []


def add_lora(model: nn.Module, cfg: LoRAConfig, heads: dict[str, nn.Module] | None = None) -> LoRA:
    """Freeze `model`'s weights and attach fresh adapters to its projections named in cfg.targets
    (B = 0: the model's output is unchanged until they train). Adapters take the dtype and device of
    the weight they adapt; the optimizer keeps fp32 masters for bf16 ones. `heads` ({PEFT name:
    module}, e.g. {"score": rm.score}) stay trainable in full and are saved with the adapters."""
    if not cfg.enabled:
        raise ValueError(f"lora.rank is {cfg.rank}: expected a rank >= 1 to add adapters")
    moe = getattr(getattr(model, "config", None), "moe", None)
    mlp = [t for t in cfg.targets if t in ("gate_proj", "up_proj", "down_proj")]
    if moe is not None and mlp:
        raise ValueError(f"lora.target_modules has {','.join(mlp)}: on a mixture-of-experts model "
                         f"({model.config.model_type}) PEFT applies them to the experts, which "
                         "fusedrl does not adapt; set "
                         "lora.target_modules=q_proj,k_proj,v_proj,o_proj")
    model.requires_grad_(False)
    for head in (heads or {}).values():
        head.requires_grad_(True)
    return LoRA(model, cfg, heads)
