"""The scalar heads of the reward and value models, kept in fp32 whatever the trunk's dtype: their
outputs are regression values (rewards, values) whose small differences drive the advantages, and
bf16 keeps only 3 significant digits."""
from __future__ import annotations

import torch
from torch import nn


class ScalarHead(nn.Linear):
    """Linear [H] -> [1] without bias, fp32 weight, reading hidden states of any dtype."""

    def __init__(self, hidden_size: int, device=None):
        super().__init__(hidden_size, 1, bias=False, dtype=torch.float32, device=device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> fp32 [..., 1]."""
        return super().forward(hidden.float())
