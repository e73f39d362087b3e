"""The masked statistics of [..., T] tensors and the loss aggregation rules, in plain PyTorch:
masked mean, moments and whitening, and the per-row weights each aggregation gives a loss's
tokens. The oracle's and the ops' alike: fusedrl.kernels.rl.statistics (the policy-ratio
corrections, the group advantages) and the fused losses build on these, and the fast paths
(masked_whiten's Triton kernels, the losses' finalize kernel) are tested against them.

Rows split over ranks: every statistic that pools entries takes `sum_over`, the reduction that sums
a small tensor of partial sums over the ranks (a function, or a torch.distributed.ProcessGroup;
None, or a group of one rank, is one process). With it each rank gets what one process computes on
all ranks' rows, to fp32 rounding, at any number of ranks: the statistics go through sums and counts
(one call for a mean, two for moments: the mean first, then the centered squares), never through
gathered rows.

Computed in float64 for float64 inputs (the oracle's precision), in float32 otherwise;
differentiated by autograd (with sum_over, each rank differentiates its own entries: the sum over
the other ranks' is a constant).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

SumFn = Callable[[torch.Tensor], torch.Tensor]
SumOver = Union[None, SumFn, "dist.ProcessGroup"]


def summing(sum_over: SumOver) -> Optional[SumFn]:
    """sum_over as a function, or None where there is nothing to sum (None, or a group of one
    rank)."""
    if sum_over is None or callable(sum_over):
        return sum_over
    group_type = getattr(dist, "ProcessGroup", None)
    if group_type is None or not isinstance(sum_over, group_type):
        raise TypeError(f"sum_over: expected None, a function or a torch.distributed.ProcessGroup, "
                        f"got {type(sum_over).__name__}")
    if sum_over.size() == 1:
        return None

    def all_reduce(partials: torch.Tensor) -> torch.Tensor:
        out = partials.detach().clone()
        dist.all_reduce(out, group=sum_over)
        return out
    return all_reduce


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (the oracle), float32 for everything else."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def valid_entries(mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """mask != 0 as bool (every entry of `like` when mask is None)."""
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    return mask != 0


# ---- masked mean, moments, whitening -----------------------------------------------------------

def _masked_sum(x, valid, dim, keepdim, sum_fn):
    """(sum of x over the valid entries, their count) along dim, both in x's dtype, each summed over
    the ranks by sum_fn when given (one call: the two go stacked)."""
    total = torch.where(valid, x, 0.0).sum(dim=dim, keepdim=keepdim)
    count = valid.sum(dim=dim, keepdim=keepdim).to(total.dtype)
    if sum_fn is None:
        return total, count
    summed = sum_fn(torch.stack([total.detach(), count]))
    # The ranks' sum as a value, this rank's total for the gradient (each rank differentiates its
    # rows).
    return total + (summed[0] - total.detach()), summed[1]


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor] = None, dim=None, *,
                keepdim: bool = False, sum_over: SumOver = None) -> torch.Tensor:
    """Mean of x over the valid entries (mask nonzero; all when None) along dim (all of x when
    None); 0 where there are none. x [...], mask [...] -> the reduced shape, in compute_dtype(x)."""
    x = x.to(compute_dtype(x))
    total, count = _masked_sum(x, valid_entries(mask, x), dim, keepdim, summing(sum_over))
    return total / count.clamp_min(1)


def masked_moments(x: torch.Tensor, mask: Optional[torch.Tensor] = None, dim=None, *,
                   unbiased: bool = True, sum_over: SumOver = None) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """(mean, variance) of x over the valid entries along dim (all of x when None), both with dim
    kept as size 1 (every dim for None), so that x - mean broadcasts. Two passes (the mean, then the
    centered squares: no sum-of-squares cancellation); the variance divides by count - 1 when
    unbiased (at least 1)."""
    x = x.to(compute_dtype(x))
    valid, sum_fn = valid_entries(mask, x), summing(sum_over)
    total, count = _masked_sum(x, valid, dim, True, sum_fn)
    mean = total / count.clamp_min(1)
    # Centered by a select first: a non-finite x outside the mask must not reach the gradient.
    squares, count = _masked_sum(torch.where(valid, x - mean, 0.0) ** 2, valid, dim, True, sum_fn)
    return mean, squares / (count - int(unbiased)).clamp_min(1)


def masked_whiten(x: torch.Tensor, mask: Optional[torch.Tensor], *, shift_mean: bool = True,
                  eps: float = 1e-8, sum_over: SumOver = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the valid entries (unbiased variance); 0 outside the mask;
    with shift_mean=False the mean is added back (scale only). x, mask [...] -> [...] in
    compute_dtype(x). The plain composition: kernels.masked_whiten is the op (its Triton fast
    path)."""
    x = x.to(compute_dtype(x))
    valid = valid_entries(mask, x)
    mean, var = masked_moments(x, valid, sum_over=sum_over)
    white = torch.where(valid, x - mean, 0.0) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return torch.where(valid, white, 0.0)


# ---- loss aggregation --------------------------------------------------------------------------
# A loss is sum over valid tokens of weight[row] * term. With n_b valid tokens in row b, N in all,
# S non-empty rows and a constant norm (default T, verl's loss_scale_factor):
#     token-mean                w = 1 / N
#     seq-mean-token-mean       w = 1 / (S * n_b)
#     seq-mean-token-sum        w = 1 / S
#     token-sum                 w = 1
#     seq-mean-token-sum-norm   w = 1 / norm      (Dr. GRPO: the sum over all tokens / a constant)
# Rows with no valid token are left out of every mean; with no valid token at all the loss is 0.
# Each rule is a per-row divisor and the units each row adds to a shared denominator (N or S): the
# engine's micro-batches take their share of a minibatch from the same units, so a minibatch cut
# into pieces (or rows split over ranks) sums to the whole one's loss. The Triton finalize kernel
# (loss_kernels._finalize_kernel) applies the same table on the device.

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum",
        "seq-mean-token-sum-norm")


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
    """mask [..., T] -> fp32 [rows]: the weight of each valid token of each row
    (aggregation_rule)."""
    divisors, units = aggregation_rule(mask, agg, norm)
    if units is None:
        return 1.0 / divisors
    return 1.0 / (divisors * units.sum().clamp_min(1.0))


def weighted_sum(per_token: torch.Tensor, mask: Optional[torch.Tensor],
                 weights: torch.Tensor) -> torch.Tensor:
    """sum over valid tokens of weights[row] * per_token: per_token, mask [..., T], weights [rows]
    -> []."""
    weights = weights.to(per_token.dtype).view(*per_token.shape[:-1], 1)
    return torch.where(valid_entries(mask, per_token), per_token * weights, 0.0).sum()


def aggregate(per_token: torch.Tensor, mask: Optional[torch.Tensor], agg: str,
              norm: Optional[float] = None) -> torch.Tensor:
    """A per-token loss [..., T] reduced to a scalar by the rule of `agg` (mask: bool, integer or
    float, nonzero = valid). The hosts' normalizers: verl's modes are these names;
    TRL's bnpo is token-mean, its dr_grpo seq-mean-token-sum-norm with norm B x
    max_completion_length, its dapo the same with norm its num_items_in_batch."""
    return weighted_sum(per_token, mask, row_weights(valid_entries(mask, per_token), agg, norm))
