"""The loss aggregation rules, written once: how a per-token loss [..., T] becomes a scalar.

A loss is sum over valid tokens of weight[row] * term. With n_b valid tokens in row b, N in all,
S non-empty rows and a constant norm (default T, verl's loss_scale_factor):
    token-mean                w = 1 / N
    seq-mean-token-mean       w = 1 / (S * n_b)
    seq-mean-token-sum        w = 1 / S
    token-sum                 w = 1
    seq-mean-token-sum-norm   w = 1 / norm      (Dr. GRPO: the sum over all tokens / a constant)
Rows with no valid token are left out of every mean; with no valid token at all the loss is 0.

`aggregation_rule` states each rule as a per-row divisor and the units each row adds to a shared
denominator (N or S). The reference and the host paths of the losses take their row weights from
it, and the engine's micro-batches take their share of a minibatch from the same units, so a
minibatch cut into pieces (or rows split over ranks) sums to the whole one's loss. The Triton
finalize kernel (ppo_loss_kernels._finalize_kernel) applies the same table on the device.
"""
from __future__ import annotations

from typing import Optional

import torch

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum", "seq-mean-token-sum-norm")


def aggregation_rule(mask: torch.Tensor, agg: str, norm: Optional[float] = None
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The rule of `agg` for the rows of mask [..., T] (nonzero = valid): (divisors, units).

    divisors [rows] fp32: row b's own divisor (n_b for seq-mean-token-mean, norm for
    seq-mean-token-sum-norm, else 1). units [rows] fp32 or None: what row b adds to the shared
    denominator (n_b for token-mean, 1 per non-empty row for the other seq-means); None for the
    sums, which add up as they are. The weight of row b's tokens is
    1 / (divisors[b] * max(sum(units), 1)), or 1 / divisors[b] when units is None.
    """
    if agg not in AGGS:
        raise ValueError(f"aggregation_rule: unknown agg {agg!r}; expected one of {AGGS}")
    lengths = (mask != 0).sum(dim=-1).reshape(-1).float()                  # [rows]
    if agg == "token-sum":
        return torch.ones_like(lengths), None
    if agg == "seq-mean-token-sum-norm":
        return torch.full_like(lengths, float(norm or mask.shape[-1])), None
    if agg == "token-mean":
        return torch.ones_like(lengths), lengths
    divisors = lengths.clamp_min(1.0) if agg == "seq-mean-token-mean" else torch.ones_like(lengths)
    return divisors, (lengths > 0).float()


def row_weights(mask: torch.Tensor, agg: str, norm: Optional[float] = None) -> torch.Tensor:
    """mask [..., T] -> fp32 [rows]: the weight of each valid token of each row (aggregation_rule)."""
    divisors, units = aggregation_rule(mask, agg, norm)
    if units is None:
        return 1.0 / divisors
    return 1.0 / (divisors * units.sum().clamp_min(1.0))
