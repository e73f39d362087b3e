"""VisionLanguageModel: Qwen2.5-VL and Qwen3-VL as the text decoder (CausalLM, one walk for
training, scoring, prefill and decode) plus transformers' vision tower (vision/tower.py).

An image enters as transformers' Qwen2-VL image processor emits it (pixel_values [P, C * temporal
patch * patch**2], image_grid_thw [I, 3]) with its placeholder tokens already in input_ids. The
model runs the tower, puts its features in place of those tokens (their count checked against the
grids), and rotates by M-RoPE positions it computes itself (vision/mrope.py), so the features
and the positions cannot disagree with the tokens. Parameter names: the decoder's `model.*` and
`lm_head`, the tower's `visual.*` (hf_io maps the checkpoint layouts transformers writes).
"""
from __future__ import annotations

import functools

import torch

from ..data.device_tensors import last_rows
from ..data.prefix_sharing import members, share_prefixes
from .causal_lm import CausalLM
from .config import ModelConfig
from .vision.mrope import packed_positions
from .vision.rows import VisualRows, placeholder_rows
from .vision.tower import (ImageFeatures, build_tower, encode_images,
                           restore_computed_buffers)


class VisionLanguageModel(CausalLM):
    """CausalLM + `visual`, the vision tower. Built by hf_io.load_model for a config.json whose
    model_type is qwen2_5_vl or qwen3_vl."""

    def __init__(self, config: ModelConfig, dtype=torch.float32):
        if config.vision is None:
            raise ValueError(f"a {config.model_type} config describes no vision tower")
        super().__init__(config, dtype)
        self.visual = build_tower(config.hf_config, dtype)

    @classmethod
    def variant_of(cls, model_cls: type) -> type:
        """`model_cls`'s vision variant (vision_variant): a reward or value model built from a
        vision-language one sees the images too."""
        return vision_variant(model_cls)

    def tie_weights(self):
        """CausalLM's, and the tower's computed rotary frequencies restored (both re-run after
        `to_empty`). CausalLM's constructor calls this before the tower exists."""
        super().tie_weights()
        if "visual" in self._modules:
            restore_computed_buffers(self.visual)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw) -> ImageFeatures:
        """pixel_values [P, C*t*p*p], image_grid_thw [I, 3] -> the tower's ImageFeatures
        ([sum(t*h*w) / merge**2, hidden] in image order): computed once, reusable by any number of
        forwards over the same images."""
        return encode_images(self.visual, pixel_values, image_grid_thw, self.config.vision)

    def visual_rows(self, input_ids: torch.Tensor, features: ImageFeatures | None
                    ) -> VisualRows | None:
        """The placeholder tokens of input_ids [N] joined with `features` (None without images);
        a count that differs is a one-line ValueError, placeholders without features too."""
        rows = placeholder_rows(input_ids, self.config.vision.image_token_id)
        if features is None:
            if rows.numel():
                raise ValueError(f"input_ids: {rows.numel()} image placeholder tokens (id "
                                 f"{self.config.vision.image_token_id}) but no images given")
            return None
        return VisualRows(rows, features)

    def logit_bias(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """[vocab]: -inf at the image, video and vision-boundary ids, 0 elsewhere: the mask the
        engine's sampler applies, as `bias=` of kernels.linear_token_logprobs, so training's
        log-probs are under the distribution the rollout drew from."""
        bias = torch.zeros(self.config.vocab_size, dtype=dtype, device=device)
        bias[list(self.config.vision.vision_token_ids)] = float("-inf")
        return bias

    def position_shape(self, input_ids) -> tuple[int, ...]:
        """M-RoPE's [3, N]."""
        return (3, input_ids.shape[0])

    def mrope_positions(self, input_ids: torch.Tensor, seqlens: list[int], image_grid_thw=None
                        ) -> tuple[torch.Tensor, list[int]]:
        """input_ids [N] of packed sequences -> (M-RoPE positions [3, N], each sequence's decode
        offset [S]); the placeholder runs checked against image_grid_thw [I, 3]."""
        return packed_positions(input_ids, seqlens, image_grid_thw, self.config.vision)

    def forward_packed(self, input_ids, seqlens: list[int], positions=None, cu_seqlens=None,
                       visual=None, *, pixel_values=None, image_grid_thw=None,
                       features: ImageFeatures | None = None):
        """CausalLM.forward_packed with images: pixel_values and image_grid_thw of every image of
        the pack in token order (or their `features`, encoded once), placed at the placeholders;
        positions [3, N] when given, else computed here (1-D ones, a text pack's, too: for text
        they are the same on every axis). -> hidden [N, hidden]."""
        self.check_input_ids(input_ids)
        if positions is None or positions.dim() == 1:
            positions = self.mrope_positions(input_ids, seqlens, image_grid_thw)[0]
        if pixel_values is not None:
            if features is not None:
                raise ValueError("give pixel_values or their features, not both")
            features = self.encode_images(pixel_values, image_grid_thw)
        if visual is None:
            visual = self.visual_rows(input_ids, features)
        return super().forward_packed(input_ids, seqlens, positions, cu_seqlens, visual)

    def forward_rows(self, packed, layout=None):
        """CausalLM.forward_rows over a pack that may hold images (`packed.pixel_values`,
        `packed.image_grid_thw`, None or absent for text). With packed.prefix_groups (layout:
        engine/data/prefix_sharing.py's, built here when not given) a group's rows read their
        prompt once, its images included: a group shares one prompt row's images (pack_sequences
        groups rows by their prompt tokens and their images), so its first row's images are
        encoded once and placed at the shared prompt's placeholders, and every token keeps its
        row's M-RoPE position (the shared prompt's are the prompt's own)."""
        pixels = getattr(packed, "pixel_values", None)
        if pixels is None and not bool(
                (packed.input_ids == self.config.vision.image_token_id).any()):
            return super().forward_rows(packed, layout)
        grids = getattr(packed, "image_grid_thw", None)
        layout = layout or share_prefixes(packed)
        if layout is None:
            hidden = self.forward_packed(packed.input_ids, packed.seqlens, None,
                                         packed.cu_seqlens, pixel_values=pixels,
                                         image_grid_thw=grids)
            last = last_rows(packed.seqlens, hidden.device)
            return hidden, packed.target_rows, last
        self.check_input_ids(packed.input_ids)
        positions = self.mrope_positions(packed.input_ids, packed.seqlens, grids)[0]
        ids = packed.input_ids.index_select(0, layout.token_index)
        firsts = [rows[0] for rows in members(packed.prefix_groups).values()]
        pixels, grids, _ = packed.images_of(firsts)
        features = None if pixels is None else self.encode_images(pixels, grids)
        return self.forward_shared(ids, positions.index_select(1, layout.token_index), layout,
                                   self.visual_rows(ids, features))


@functools.cache
def vision_variant(model_cls: type) -> type:
    """`model_cls` (CausalLM or a subclass with heads: the reward model's `score`, the critic's
    `value_head`) for a vision-language config: VisionLanguageModel for CausalLM, else a subclass
    of both (named Vision + its name) whose forwards place each pack's images as the policy's do
    (forward_packed, forward_rows), so its heads read hidden states that saw the images. The one
    class per `model_cls` (cached), so isinstance holds across loads."""
    if issubclass(model_cls, VisionLanguageModel):
        return model_cls
    if model_cls is CausalLM:
        return VisionLanguageModel
    return type(f"Vision{model_cls.__name__}", (model_cls, VisionLanguageModel),
                {"__doc__": f"{model_cls.__name__} on a vision-language model (vision_variant).",
                 "__module__": __name__})
