"""Hugging Face tensor names <-> the engine's parameters, and this rank's box of a parameter.

A checkpoint tensor is one or more row blocks of one parameter: a whole parameter, or a part of a
packed projection (q/k/v, gate/up) at the rows `PackedProjection.row_blocks` gives. A parameter is
a plain tensor (one process, or a replicated LoRA head) or a DTensor sharded by any `Shard(d)`
placements on a 1-D or 2-D mesh; its local shard is the box at `offsets` of the global tensor. The
overlap of a block with that box is what a rank reads at load, adds at a LoRA merge, and nothing
more: no rank ever materializes a whole parameter here.

MoE blocks (moe.py) hold transformers 5's packed layout (`mlp.experts.gate_up_proj [E, 2I, H]`,
`mlp.experts.down_proj [E, H, I]`, `mlp.gate.weight`). Checkpoints carry either that layout or the
per-expert one that transformers' save_pretrained still writes (and older checkpoints have):
Qwen3-MoE `mlp.experts.N.{gate,up,down}_proj.weight`, Mixtral `block_sparse_moe.experts.N.{w1,w3,w2}
.weight` and `block_sparse_moe.gate.weight`. The blocks name the per-expert layout (what saving
writes, as save_pretrained); an expert's tensor is a block of `param[e]` (Block's `lead`), so a rank
reads and writes only the experts its shard holds. `packed_blocks` maps the packed layout's names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .causal_lm import PackedProjection
from .moe import SparseMoeBlock


@dataclass(frozen=True)
class Block:
    """Rows [part_row, part_row + rows) of the Hugging Face tensor `name` are rows [row, row + rows)
    of the parameter `param` (named `param_name` in the model), or with `lead` of `param[lead]` (the
    parameter's first dimensions fixed: one expert of a packed MoE expert weight)."""
    name: str
    param_name: str
    param: torch.Tensor
    row: int
    part_row: int
    rows: int
    lead: tuple[int, ...] = ()


def hf_blocks(model: nn.Module) -> dict[str, list[Block]]:
    """Hugging Face tensor name -> its row blocks, in the model's parameter order (a packed
    projection's parts in their row_blocks order). The tied LM head appears once, as the embedding
    (named_parameters lists a shared parameter once)."""
    packed = {name: module for name, module in model.named_modules()
              if isinstance(module, PackedProjection)}
    blocks: dict[str, list[Block]] = {}
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner not in packed:
            blocks[name] = [Block(name, name, param, 0, 0, param.shape[0])]
            continue
        parent = owner.rpartition(".")[0]
        for part, row, part_row, rows in packed[owner].row_blocks():
            hf_name = f"{parent}.{part}.{leaf}"
            blocks.setdefault(hf_name, []).append(Block(hf_name, name, param, row, part_row, rows))
    return per_expert_blocks(model, blocks)


def _moe_blocks(model: nn.Module):
    """(module path, block, parameter names) of every MoE block, e.g. ("model.layers.0.mlp",
    ...)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(path, m, names) for path, m in model.named_modules() if isinstance(m, SparseMoeBlock)]


def per_expert_blocks(model: nn.Module, blocks: dict) -> dict:
    """`blocks` (weight_map.hf_blocks: name -> row blocks) with each MoE block's parameters under
    their per-expert checkpoint names instead, grouped by parameter (all gate/up blocks, then all
    down blocks: an export gathers each parameter once)."""
    for path, block, names in _moe_blocks(model):
        for leaf in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
            blocks.pop(f"{path}.{leaf}", None)
        base, gate, up, down = block.moe.legacy_names
        prefix, size = f"{path.rpartition('.')[0]}.{base}", block.moe.intermediate_size
        router = block.gate.weight
        gate_up, down_w = block.experts.gate_up_proj, block.experts.down_proj
        blocks[f"{prefix}.gate.weight"] = [
            Block(f"{prefix}.gate.weight", names[id(router)], router, 0, 0,
                  router.shape[0])]
        for e in range(block.moe.num_experts):
            for part, row in ((gate, 0), (up, size)):
                name = f"{prefix}.experts.{e}.{part}.weight"
                blocks[name] = [Block(name, names[id(gate_up)], gate_up, row, 0, size, (e,))]
        for e in range(block.moe.num_experts):
            name = f"{prefix}.experts.{e}.{down}.weight"
            blocks[name] = [Block(name, names[id(down_w)], down_w, 0, 0, down_w.shape[1], (e,))]
    return blocks


def packed_blocks(model: nn.Module) -> dict[str, tuple[list, list[str]]]:
    """Packed-layout checkpoint name -> (the whole parameter it fills, as blocks; the per-expert
    names it stands for), for the names that differ from the per-expert layout's."""
    packed = {}
    for path, block, names in _moe_blocks(model):
        base, gate, up, down = block.moe.legacy_names
        prefix, n = f"{path.rpartition('.')[0]}.{base}", block.moe.num_experts

        def whole(name, param):
            return [Block(name, names[id(param)], param, 0, 0, param.shape[0])]
        packed[f"{path}.experts.gate_up_proj"] = (
            whole(f"{path}.experts.gate_up_proj", block.experts.gate_up_proj), [
            f"{prefix}.experts.{e}.{part}.weight" for e in range(n) for part in (gate, up)])
        packed[f"{path}.experts.down_proj"] = (
            whole(f"{path}.experts.down_proj", block.experts.down_proj),
            [f"{prefix}.experts.{e}.{down}.weight" for e in range(n)])
        if f"{prefix}.gate.weight" != f"{path}.gate.weight":
            packed[f"{path}.gate.weight"] = (whole(f"{path}.gate.weight", block.gate.weight),
                                             [f"{prefix}.gate.weight"])
    return packed


def hf_shape(blocks: list[Block]) -> tuple[int, ...]:
    """The Hugging Face tensor's shape: its blocks' rows, the parameter's other dimensions."""
    first = blocks[0]
    return (sum(b.rows for b in blocks), *first.param.shape[len(first.lead) + 1:])


def local_box(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(this rank's piece of `tensor`, its offsets in the global tensor): a DTensor's local shard
    (any Shard placements, uneven ones included, as DTensor computes them), a plain tensor whole."""
    if hasattr(tensor, "to_local"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        local = tensor.to_local()
        shape, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh,
                                                               tensor.placements)
        # guards the offsets: they are only right for this layout
        if tuple(shape) != tuple(local.shape):
            raise ValueError(
                f"a local shard of shape {tuple(local.shape)}: expected {tuple(shape)} from its "
                "placements")
        return local, list(offsets)
    return tensor, [0] * tensor.dim()


def overlap(block: Block, offsets: list[int], shape) -> Optional[tuple[tuple, tuple]]:
    """(index into the Hugging Face tensor, index into the local box) of the rows of `block` inside
    the box at `offsets` of size `shape`; None when they do not meet."""
    k = len(block.lead)  # fixed leading indices: inside the box or not at all
    if any(not o <= i < o + n for i, o, n in zip(block.lead, offsets, shape)):
        return None
    lead = tuple(i - o for i, o in zip(block.lead, offsets))
    offsets, shape = offsets[k:], shape[k:]
    lo, hi = max(block.row, offsets[0]), min(block.row + block.rows, offsets[0] + shape[0])
    if hi <= lo or any(n == 0 for n in shape):
        return None
    shift = block.part_row - block.row
    source = (slice(lo + shift, hi + shift),
              *(slice(o, o + n) for o, n in zip(offsets[1:], shape[1:])))
    target = (*lead, slice(lo - offsets[0], hi - offsets[0]), *(slice(0, n) for n in shape[1:]))
    return source, target


@torch.no_grad()
def add_rows(param: torch.Tensor, row: int, delta: torch.Tensor) -> None:
    """param[row:row + R] += delta [R, ...] (summed in fp64, rounded once into param's dtype), on
    this rank's shard only: each rank adds the rows and columns it holds."""
    local, offsets = local_box(param)
    found = overlap(Block("", "", param, row, 0, delta.shape[0]), offsets, local.shape)
    if found is not None:
        source, target = found
        local[target] = (local[target].double() + delta[source].double()).to(local.dtype)
