"""Checkpoint names of the MoE blocks' parameters, for hf_io's load and save.

The model holds transformers 5's packed layout (`mlp.experts.gate_up_proj [E, 2I, H]`,
`mlp.experts.down_proj [E, H, I]`, `mlp.gate.weight`). Checkpoints carry either that layout or the
per-expert one that transformers' save_pretrained still writes (and older checkpoints have):
Qwen3-MoE `mlp.experts.N.{gate,up,down}_proj.weight`, Mixtral `block_sparse_moe.experts.N.{w1,w3,w2}
.weight` and `block_sparse_moe.gate.weight`. Saving writes the per-expert layout, as save_pretrained.
"""
from __future__ import annotations

import torch
from torch import nn

from .moe import SparseMoeBlock


def _blocks(model: nn.Module):
    """(module path, block) of every MoE block, e.g. ("model.layers.0.mlp", block)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoeBlock)]


def _layer_prefix(path: str) -> str:
    return path.rpartition(".")[0]  # "model.layers.0.mlp" -> "model.layers.0"


def per_expert_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (hf_io's name -> parameter) with each MoE block's parameters replaced by their
    per-expert checkpoint names -> views (copying into a view loads that expert's part)."""
    for path, block in _blocks(model):
        for leaf in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
            tensors.pop(f"{path}.{leaf}", None)
        base, gate, up, down = block.moe.legacy_names
        prefix, size = f"{_layer_prefix(path)}.{base}", block.moe.intermediate_size
        tensors[f"{prefix}.gate.weight"] = block.gate.weight
        for e in range(block.moe.num_experts):
            tensors[f"{prefix}.experts.{e}.{gate}.weight"] = block.experts.gate_up_proj[e, :size]
            tensors[f"{prefix}.experts.{e}.{up}.weight"] = block.experts.gate_up_proj[e, size:]
            tensors[f"{prefix}.experts.{e}.{down}.weight"] = block.experts.down_proj[e]
    return tensors


def packed_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """Packed-layout checkpoint name -> (the parameter it fills, the per-expert names it stands
    for), for the names that differ from the per-expert layout's."""
    packed = {}
    for path, block in _blocks(model):
        base, gate, up, down = block.moe.legacy_names
        prefix, n = f"{_layer_prefix(path)}.{base}", block.moe.num_experts
        packed[f"{path}.experts.gate_up_proj"] = (block.experts.gate_up_proj, [
            f"{prefix}.experts.{e}.{part}.weight" for e in range(n) for part in (gate, up)])
        packed[f"{path}.experts.down_proj"] = (block.experts.down_proj,
                                               [f"{prefix}.experts.{e}.{down}.weight" for e in range(n)])
        if f"{prefix}.gate.weight" != f"{path}.gate.weight":
            packed[f"{path}.gate.weight"] = (block.gate.weight, [f"{prefix}.gate.weight"])
    return packed
