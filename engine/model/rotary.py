"""The decoder's rotary angles: one fp32 table of every position's cos/sin, and the rows a forward's
tokens gather from it (1-D positions [N], or M-RoPE's [3, N] of a vision-language model)."""
from __future__ import annotations

import torch

from ... import kernels
from .config import ModelConfig


class RotaryTable:
    """cos/sin [L, D] of every position below max_model_len, computed in fp32 as transformers does,
    kept out of the module's buffers so that `model.to(bfloat16)` cannot round the angles. Per
    (device, dtype) a cast copy is cached (`tables`); RotaryAngles gathers a forward's rows.
    `axes` [D / 2] (M-RoPE, None for a text model): which of a token's three positions (time,
    height, width) each frequency's angle is taken at."""

    def __init__(self, config: ModelConfig):
        # Built on the CPU explicitly: the model itself may be constructed under a meta device.
        positions = torch.arange(config.max_model_len, dtype=torch.int64, device="cpu").float()
        freqs = positions[:, None] * config.inv_freq().to("cpu")[None, :]  # [L, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [L, D]
        self.cos, self.sin = emb.cos(), emb.sin()
        self.axes = None
        if config.vision is not None:
            self.axes = torch.tensor(config.vision.mrope_axes, dtype=torch.int64, device="cpu")
        self._cast: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def tables(self, device, dtype) -> tuple[torch.Tensor, ...]:
        """(cos, sin) [max_model_len, D] in `dtype` on `device`, and `axes` there (or None); cast
        once, then cached."""
        key = (torch.device(device), dtype)
        if key not in self._cast:
            axes = None if self.axes is None else self.axes.to(device)
            self._cast[key] = (self.cos.to(device, dtype), self.sin.to(device, dtype), axes)
        return self._cast[key]


class RotaryAngles:
    """The rotary angles of one forward's tokens: the tables and the positions, each token's rows
    gathered on the first `rotate` (once for every layer). A fused decode attention reads the
    tables by position itself, so a decode step gathers nothing (its positions are 1-D: past a
    prompt every M-RoPE axis holds the same position).

    positions [N], or [3, N] for M-RoPE: frequency d of token n then takes its angle at position
    positions[axes[d], n], which is transformers' composition of the three axes' angles (each a
    row of the same fp32 table, so the values are bitwise the ones it computes); kernels.mrope
    reads them from the tables inside the rotation (no rows gathered)."""

    def __init__(self, table: RotaryTable, positions: torch.Tensor, dtype, rope):
        self.cos_table, self.sin_table, self.axes = table.tables(positions.device, dtype)
        if positions.dim() == 2 and (self.axes is None or positions.shape[0] != 3):
            raise ValueError(f"positions of shape {tuple(positions.shape)}: [3, N] positions are "
                             "M-RoPE's, for a vision-language model; expected [N]")
        self.positions = positions
        self.rope = rope  # the walk's primitive: (q, k, cos [N, D], sin [N, D]) -> rotated (q, k)
        self._rows = None

    def rotate(self, q, k):
        """q [N, H, D], k [N, Hkv, D] -> rotated (q, k)."""
        if self.positions.dim() == 2:
            return kernels.mrope(q, k, self.cos_table, self.sin_table, self.positions, self.axes)
        if self._rows is None:
            self._rows = (self.cos_table[self.positions], self.sin_table[self.positions])
        return self.rope(q, k, *self._rows)
