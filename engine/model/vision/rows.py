"""VisualRows: one forward's image features and the rows of its tokens they belong to, what the
decoder walk takes from a vision-language model (CausalLM.hidden_states' `visual`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tower import ImageFeatures


@dataclass(frozen=True)
class VisualRows:
    """rows [M] int64: the forward's placeholder tokens (indices into its N tokens, in order);
    features: theirs (embeds [M, hidden], Qwen3-VL's deepstack [M, hidden] per early layer)."""

    rows: torch.Tensor
    features: ImageFeatures

    def __post_init__(self):
        if self.rows.shape[0] != self.features.embeds.shape[0]:
            raise ValueError(f"image placeholders: {self.rows.shape[0]} tokens for "
                             f"{self.features.embeds.shape[0]} image feature rows")

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, hidden], the token embeddings -> the same with the features at `rows` (a copy:
        x may be what autograd keeps)."""
        return x.index_copy(0, self.rows, self.features.embeds.to(x.dtype))

    def after_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """A decoder layer's output x [N, hidden] with deepstack feature `layer` added at `rows`
        (Qwen3-VL's first len(deepstack) layers); x itself past them."""
        if layer >= len(self.features.deepstack):
            return x
        return x.index_add(0, self.rows, self.features.deepstack[layer].to(x.dtype))


def placeholder_rows(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """input_ids [N] -> the indices [M] int64 of its image placeholder tokens, in order."""
    return (input_ids == image_token_id).nonzero().flatten()
