"""Hugging Face tensor names <-> the engine's parameters, and this rank's box of a parameter.

A checkpoint tensor is one or more row blocks of one parameter: a whole parameter, or a part of a
packed projection (q/k/v, gate/up) at the rows `PackedProjection.row_blocks` gives. A parameter is
a plain tensor (one process, or a replicated LoRA head) or a DTensor sharded by any `Shard(d)`
placements on a 1-D or 2-D mesh; its local shard is the box at `offsets` of the global tensor. The
overlap of a block with that box is what a rank reads at load, adds at a LoRA merge, and nothing
more: no rank ever materializes a whole parameter here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .causal_lm import PackedProjection


@dataclass(frozen=True)
class Block:
    """Rows [part_row, part_row + rows) of the Hugging Face tensor `name` are rows [row, row + rows)
    of the parameter `param` (named `param_name` in the model)."""
    name: str
    param_name: str
    param: torch.Tensor
    row: int
    part_row: int
    rows: int


def hf_blocks(model: nn.Module) -> dict[str, list[Block]]:
    """Hugging Face tensor name -> its row blocks, in the model's parameter order (a packed
    projection's parts in their row_blocks order). The tied LM head appears once, as the embedding
    (named_parameters lists a shared parameter once)."""
    packed = {name: module for name, module in model.named_modules() if isinstance(module, PackedProjection)}
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
    return blocks


def hf_shape(blocks: list[Block]) -> tuple[int, ...]:
    """The Hugging Face tensor's shape: its blocks' rows, the parameter's other dimensions."""
    return (sum(b.rows for b in blocks), *blocks[0].param.shape[1:])


def local_box(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(this rank's piece of `tensor`, its offsets in the global tensor): a DTensor's local shard
    (any Shard placements, uneven ones included, as DTensor computes them), a plain tensor whole."""
    if hasattr(tensor, "to_local"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        local = tensor.to_local()
        shape, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        if tuple(shape) != tuple(local.shape):  # guards the offsets: they are only right for this layout
            raise ValueError(f"a local shard of shape {tuple(local.shape)}: expected {tuple(shape)} from its placements")
        return local, list(offsets)
    return tensor, [0] * tensor.dim()


def overlap(block: Block, offsets: list[int], shape) -> Optional[tuple[tuple, tuple]]:
    """(index into the Hugging Face tensor, index into the local box) of the rows of `block` inside
    the box at `offsets` of size `shape`; None when they do not meet."""
    lo, hi = max(block.row, offsets[0]), min(block.row + block.rows, offsets[0] + shape[0])
    if hi <= lo or any(n == 0 for n in shape):
        return None
    shift = block.part_row - block.row
    source = (slice(lo + shift, hi + shift), *(slice(o, o + n) for o, n in zip(offsets[1:], shape[1:])))
    target = (slice(lo - offsets[0], hi - offsets[0]), *(slice(0, n) for n in shape[1:]))
    return source, target


@torch.no_grad()
def add_rows(param: torch.Tensor, row: int, delta: torch.Tensor) -> None:
    """param[row:row + R] += delta [R, ...] (summed in fp32, rounded once into param's dtype), on this
    rank's shard only: each rank adds the rows and columns it holds."""
    local, offsets = local_box(param)
    found = overlap(Block("", "", param, row, 0, delta.shape[0]), offsets, local.shape)
    if found is not None:
        source, target = found
        local[target] = (local[target].float() + delta[source].float()).to(local.dtype)
