"""The RL statistics of [..., T] tensors with a mask, written once in plain PyTorch: masked mean,
moments and whitening, the loss aggregation rules, the policy-ratio corrections (GSPO, importance
sampling) and the group-relative advantages of critic-free RL. Every other module, the engine's
included, takes its statistics from here; the one fast path is masked_whiten's Triton kernels
(whiten.py), the same numbers to fp32 rounding.

Rows split over ranks: every statistic that pools entries takes `sum_over`, the reduction that sums
a small tensor of partial sums over the ranks (a function, or a torch.distributed.ProcessGroup;
None, or a group of one rank, is one process). With it each rank gets what one process computes on
all ranks' rows, to fp32 rounding, at any number of ranks: the statistics go through sums and counts
(one call for a mean, two for moments: the mean first, then the centered squares), never through
gathered rows.

Computed in float64 for float64 inputs (the oracle's precision, see reference/rl.py), in float32
otherwise; differentiated by autograd (with sum_over, each rank differentiates its own entries: the
sum over the other ranks' is a constant).
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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: Optional[torch.Tensor], *,
                       sum_over: SumOver = None) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over the valid entries (population variances):
    values, returns, mask [...] -> 0-dim, NaN where the returns are constant."""
    returns_var = masked_moments(returns, mask, unbiased=False, sum_over=sum_over)[1].reshape(())
    error_var = masked_moments(returns - values, mask, unbiased=False,
                               sum_over=sum_over)[1].reshape(())
    return torch.where(returns_var > 0, 1.0 - error_var / returns_var, float("nan"))


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
    """A per-token loss [..., T] reduced to a scalar by the rule of `agg`."""
    return weighted_sum(per_token, mask, row_weights(valid_entries(mask, per_token), agg, norm))


# ---- policy-ratio corrections ------------------------------------------------------------------
# GSPO (Zheng et al. 2025), in verl's token-level form (compute_policy_loss_gspo): every token of a
# sequence gets the log-ratio s = mean over the sequence's valid tokens of (logp - old_logp), as a
# value, with gradient 1 with respect to its own logp: logp_eff = old_logp + sg(s) + logp -
# sg(logp). With agg="seq-mean-token-mean" this is GSPO's objective and gradient (s_i / |y_i| per
# token).
#
# Importance sampling (the sampler's distribution pi_rollout differs from the training forward's
# pi_old: other kernels, batch composition), w = pi_old / pi_rollout per token, or the product over
# the sequence's valid tokens at level="sequence" (exp of the summed log-ratio):
#     "tis"  truncated IS: the per-token loss is scaled by min(w, cap)      (advantages * min(w,
# cap))
#     "mis"  masked IS (IcePop's band): tokens (or whole sequences) with w outside [low, high] leave
#            the loss and its aggregation counts; the others keep weight 1
# Log-ratios are clamped to +-20 before exp(), as verl and OpenRLHF do.

IS_MODES = ("tis", "mis")
IS_LEVELS = ("token", "sequence")
LOG_RATIO_LIMIT = 20.0


def sequence_ratio_logp(logp: torch.Tensor, old_logp: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """logp [..., T] -> fp32 [..., T] whose log-ratio against old_logp is the sequence's mean
    log-ratio (value) and whose gradient w.r.t. logp is 1 (GSPO, see above)."""
    mean = masked_mean(logp.float() - old_logp.float(), mask, dim=-1, keepdim=True)       # [..., 1]
    return old_logp.float() + mean.detach() + (logp.float() - logp.float().detach())


def importance_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, *,
                       mode: str, level: str, cap: float, low: float, high: float
                       ) -> tuple[Optional[torch.Tensor], torch.Tensor, dict]:
    """(advantage scale [..., T] or None, kept mask [..., T] bool, stats) of the IS correction:
    the scale min(w, cap) for "tis", the tokens inside [low, high] for "mis" (the one definition
    of the masked-IS mask: the update's aggregation units and the loss's torch paths take it).

    stats (detached 0-dim fp32, over valid tokens): is_weight_mean and is_weight_max of the raw
    weights w, and is_masked_frac, the fraction of valid tokens the correction dropped (mis).
    """
    valid = mask != 0
    log_w = torch.where(valid, old_logp.float() - rollout_logp.float(), 0.0)
    if level == "sequence":
        log_w = log_w.sum(dim=-1, keepdim=True).expand_as(log_w)
    w = torch.exp(log_w.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)).detach()
    stats = {"is_weight_mean": masked_mean(w, valid),
             "is_weight_max": torch.where(valid, w, 0.0).amax() if w.numel() else w.new_zeros(())}
    if mode == "tis":
        stats["is_masked_frac"] = w.new_zeros(())
        return torch.where(valid, w.clamp(max=cap), 0.0), valid, stats
    keep = valid & (w >= low) & (w <= high)
    stats["is_masked_frac"] = masked_mean((valid & ~keep).float(), valid)
    return None, keep, stats


# ---- group-relative advantages -----------------------------------------------------------------
# Each prompt's n sampled responses are scored against each other. [P, n] is tiny next to a
# rollout's token tensors, so a kernel would not earn its place.

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


def group_advantages(scores: torch.Tensor, *, estimator: str, eps: float = 1e-6,
                     sum_over: SumOver = None,
                     valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """scores [P, n] (n responses per prompt) -> fp32 advantages [P, n].

    grpo: (s - group mean) / (group std + eps), unbiased std (verl compute_grpo_outcome_advantage);
    dr_grpo: s - group mean (Dr. GRPO drops the std); rloo: s - mean of the other n - 1 (verl
    compute_rloo_outcome_advantage); reinforce_pp_baseline: s - group mean, then whitened over the
    batch, all ranks' groups with sum_over (verl
    compute_reinforce_plus_plus_baseline_outcome_advantage). A group whose scores are all equal gets
    advantage 0. Needs n >= 2 and finite scores (drop non-finite rows first). Under sum_over every
    rank must call it (it is a collective for reinforce_pp_baseline), with P >= 0 groups each.
    valid [P, n] bool (None: all): the responses that are samples of their group; the others'
    scores are not read (NaN allowed) and their advantage is 0, every statistic is the valid
    ones' (a group of k valid responses is a group of k; k < 2 gives advantage 0).
    """
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(
            f"group_advantages: unknown estimator {estimator!r}; "
            f"expected one of {GROUP_ESTIMATORS}")
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"group_advantages: scores must be [P, n] with n >= 2 responses per prompt, "
            f"got shape {tuple(scores.shape)}")
    if valid is not None and (valid.shape != scores.shape or valid.dtype != torch.bool):
        raise ValueError(f"group_advantages: valid must be bool {tuple(scores.shape)} like scores, "
                         f"got {valid.dtype} {tuple(valid.shape)}")
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    if not torch.isfinite(scores[valid]).all():
        raise ValueError(
            "group_advantages: scores must be finite (drop the rows with a non-finite score first)")
    s = torch.where(valid, scores.float(), 0.0)
    count = valid.sum(dim=1, keepdim=True)                                 # [P, 1]
    mean, var = masked_moments(s, valid, dim=1)                            # [P, 1] each, unbiased
    centered = torch.where(valid, s - mean, 0.0)
    if estimator == "grpo":  # verl's normalizer: std + eps, not whitening's sqrt(var + eps)
        return centered / (var.sqrt() + eps)
    if estimator == "rloo":  # s - (sum - s) / (k - 1)
        return centered * count / (count - 1).clamp_min(1)
    if estimator == "dr_grpo":
        return centered
    batch_mean, batch_var = masked_moments(centered, valid, sum_over=sum_over)
    return torch.where(valid, (centered - batch_mean) / (batch_var.sqrt() + eps), 0.0)
