"""VisionSpec: what a vision-language config.json says beyond its text decoder: the special token
ids, the patch geometry and the layout of M-RoPE's three position axes over the rotary columns."""
from __future__ import annotations

from dataclasses import dataclass

# model_type -> the text decoder architecture its `text_config` describes (config.py's _ARCHS).
VISION_FAMILIES = {"qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3"}


@dataclass(frozen=True)
class VisionSpec:
    """family: config.json's model_type. mrope_axes[j]: which position axis (0 time, 1 height, 2
    width) rotates rotary column j and j + head_dim / 2. deepstack_layers: how many decoder layers
    add a deepstack feature after them (Qwen3-VL; 0 for Qwen2.5-VL)."""

    family: str
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    spatial_merge_size: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    mrope_axes: tuple[int, ...]
    deepstack_layers: int

    @property
    def vision_token_ids(self) -> tuple[int, ...]:
        """The ids a sampler must never emit: image, video and the vision boundaries."""
        return (self.image_token_id, self.video_token_id, self.vision_start_token_id,
                self.vision_end_token_id)

    def tokens_per_image(self, grid_thw) -> int:
        """Placeholder tokens of one image of grid (t, h, w) in patches: t * h * w / merge**2."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.spatial_merge_size ** 2

    @classmethod
    def from_hf(cls, hf_config, head_dim: int) -> "VisionSpec":
        """The spec of a transformers Qwen2_5_VLConfig or Qwen3VLConfig (head_dim: the
        decoder's)."""
        family = hf_config.model_type
        vision, text = hf_config.vision_config, hf_config.text_config
        section = list((getattr(text, "rope_parameters", None) or {}).get("mrope_section") or ())
        ids = {name: getattr(hf_config, name, None) for name in (
            "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
        for name, value in ids.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"config.json: {name}={value!r}, expected a token id")
        return cls(family=family, **ids, spatial_merge_size=vision.spatial_merge_size,
                   patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                   in_channels=vision.in_channels,
                   mrope_axes=mrope_axes(family, section, head_dim),
                   deepstack_layers=len(getattr(vision, "deepstack_visual_indexes", None) or ()))


def mrope_axes(family: str, section: list[int], head_dim: int) -> tuple[int, ...]:
    """The axis of each of the head_dim / 2 rotary frequencies, as transformers composes them:
    Qwen2.5-VL in three contiguous runs of mrope_section's sizes (time, height, width); Qwen3-VL
    interleaved (column j: height where j % 3 == 1 and j < 3 * section[1], width where j % 3 == 2
    and j < 3 * section[2], time elsewhere)."""
    half = head_dim // 2
    if len(section) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                for s in section):
        raise ValueError(f"config.json: text_config mrope_section={section!r}, expected three "
                         "non-negative ints")
    if family == "qwen2_5_vl":
        if sum(section) != half:
            raise ValueError(f"config.json: mrope_section={section} sums to {sum(section)}, "
                             f"expected head_dim / 2 = {half}")
        return tuple(axis for axis, size in enumerate(section) for _ in range(size))
    axes = [0] * half
    for axis in (1, 2):
        for j in range(axis, min(3 * section[axis], half), 3):
            axes[j] = axis
    return tuple(axes)
