"""The vision tower: transformers' own module for the family (Qwen2.5-VL's windowed ViT and patch
merger, Qwen3-VL's ViT with its deepstack mergers), built from config.json's vision_config.

Why transformers' module and not ours: the tower runs once per prompt (a GRPO group's samples share
its output) and is frozen by default, so it is a small share of a rollout's or an update's time;
transformers' module is its reference implementation, kept current with every checkpoint revision
(window attention, interpolated position embeddings), so its outputs are the reference's by
construction. The decoder, where the tokens' time goes, is ours. The tower's weights are loaded and
saved by fusedrl's safetensors path like every other parameter (`visual.*`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import VisionSpec


@dataclass(frozen=True)
class ImageFeatures:
    """The tower's output for some images: embeds [n_tokens, hidden], one row per placeholder token
    in token order; deepstack: Qwen3-VL's features [n_tokens, hidden] added after decoder layer i
    (empty for Qwen2.5-VL)."""

    embeds: torch.Tensor
    deepstack: tuple[torch.Tensor, ...] = ()

    def rows(self, index: torch.Tensor) -> "ImageFeatures":
        """The features of the placeholder tokens `index` [M] (int64 into the n_tokens)."""
        return ImageFeatures(self.embeds.index_select(0, index),
                             tuple(d.index_select(0, index) for d in self.deepstack))


def build_tower(hf_config, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' vision module for `hf_config` (a Qwen2_5_VLConfig or Qwen3VLConfig), in
    `dtype`, on the current default device (the meta device while a checkpoint is loaded)."""
    if hf_config.model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as Tower)
    else:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as Tower
    return Tower._from_config(hf_config.vision_config, dtype=dtype)


def restore_computed_buffers(tower: torch.nn.Module) -> None:
    """Recompute the tower's rotary frequencies (non-persistent buffers, not in any checkpoint)
    after `to_empty`, which leaves them uninitialized, exactly as the module's constructor does."""
    rotary = tower.rotary_pos_emb
    inv_freq, _ = rotary.compute_axial_rope_parameters(tower.config)
    with torch.no_grad():
        for name in ("inv_freq", "original_inv_freq"):
            getattr(rotary, name).copy_(inv_freq)


def encode_images(tower: torch.nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                  spec: VisionSpec) -> ImageFeatures:
    """pixel_values [P, C * temporal_patch * patch**2] and image_grid_thw [I, 3] as transformers'
    Qwen2-VL image processor emits them -> ImageFeatures of sum(t*h*w) / merge**2 tokens."""
    width = spec.in_channels * spec.temporal_patch_size * spec.patch_size ** 2
    grid = torch.as_tensor(image_grid_thw, dtype=torch.int64)
    if grid.dim() != 2 or grid.shape[1] != 3 or (grid < 1).any():
        raise ValueError(f"image_grid_thw: shape {tuple(grid.shape)}, expected [images, 3] of "
                         "positive (t, h, w)")
    patches = int(grid.prod(-1).sum())
    if tuple(pixel_values.shape) != (patches, width):
        raise ValueError(f"pixel_values: shape {tuple(pixel_values.shape)}, expected "
                         f"({patches}, {width}) for image_grid_thw {grid.tolist()}")
    param = next(tower.parameters())
    out = tower(pixel_values.to(param.device, param.dtype), grid_thw=grid.to(param.device),
                return_dict=True)
    deepstack = tuple(getattr(out, "deepstack_features", None) or ())
    return ImageFeatures(out.pooler_output, deepstack)
