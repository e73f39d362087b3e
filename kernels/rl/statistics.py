"""The RL statistics built on the masked statistics and loss aggregation rules of
reference/statistics.py (plain PyTorch): the value function's explained variance, the policy-ratio
corrections (GSPO, importance sampling) and the group-relative advantages of critic-free RL, and the
public masked_mean, masked_moments, aggregate and aggregation_rule, reference's with their
arguments checked (a mask has exactly its tensor's shape: torch.where would broadcast it where the
count does not). Every other module, the engine's included, takes its statistics from here; the one
fast path is masked_whiten's Triton kernels (whiten.py), the same numbers to fp32 rounding.

Computed in float64 for float64 inputs (the oracle's precision, see reference/rl.py), in float32
otherwise; differentiated by autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks
from ..dispatch import sync_checks_enabled
from ..reference import statistics as plain
from ..reference.statistics import (AGGS, SumFn, SumOver, compute_dtype, masked_whiten,
                                    row_weights, summing, valid_entries, weighted_sum)

__all__ = ["AGGS", "SumFn", "SumOver", "compute_dtype", "masked_whiten", "row_weights", "summing",
           "valid_entries", "weighted_sum", "masked_mean", "masked_moments", "aggregation_rule",
           "aggregate", "explained_variance", "clip_fractions", "IS_MODES", "IS_LEVELS",
           "LOG_RATIO_LIMIT", "check_is_options", "sequence_ratio_logp", "importance_weights",
           "GROUP_ESTIMATORS", "group_advantages"]


def _checked_mask(op: str, x: torch.Tensor, mask, name: str = "x"):
    """x's mask as the ops take it (checks.mask_arg): None, or exactly x's shape and device."""
    checks.check_tensor(op, name, x)
    return checks.mask_arg(op, mask, name, x)


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor] = None, dim=None, *,
                keepdim: bool = False, sum_over: SumOver = None) -> torch.Tensor:
    """Mean of x over the valid entries (mask nonzero; all when None) along dim (all of x when
    None); 0 where there are none. x [...], mask [...] (x's shape exactly) -> the reduced shape,
    in compute_dtype(x)."""
    mask = _checked_mask("masked_mean", x, mask)
    return plain.masked_mean(x, mask, dim, keepdim=keepdim, sum_over=sum_over)


def masked_moments(x: torch.Tensor, mask: Optional[torch.Tensor] = None, dim=None, *,
                   unbiased: bool = True, sum_over: SumOver = None) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """(mean, variance) of x [...] over the valid entries of mask [...] (x's shape exactly; None:
    all) along dim (all of x when None), both with dim kept as size 1 (every dim for None); the
    variance divides by count - 1 when unbiased (at least 1). See reference/statistics.py."""
    mask = _checked_mask("masked_moments", x, mask)
    return plain.masked_moments(x, mask, dim, unbiased=unbiased, sum_over=sum_over)


def _check_agg(op: str, agg: str, norm: Optional[float]) -> None:
    checks.check_choice(op, "agg", agg, AGGS)
    if norm is not None:
        checks.check_positive(op, "norm", norm)


def aggregation_rule(mask: torch.Tensor, agg: str, norm: Optional[float] = None
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The rule of `agg` for the rows of mask [..., T] (bool, integer or float, nonzero = valid):
    (divisors [rows] fp32, units [rows] fp32 or None), see reference/statistics.py."""
    op = "aggregation_rule"
    checks.check_dtype(op, "mask", mask, checks.MASK_DTYPES + checks.FLOAT_DTYPES)
    if mask.dim() < 1:
        raise ValueError(f"{op}: mask must have shape [..., T], got {tuple(mask.shape)}")
    _check_agg(op, agg, norm)
    return plain.aggregation_rule(mask, agg, norm)


def aggregate(per_token: torch.Tensor, mask: Optional[torch.Tensor], agg: str,
              norm: Optional[float] = None) -> torch.Tensor:
    """A per-token loss [..., T] reduced to a scalar [] by the rule of `agg` over mask [..., T]
    (per_token's shape exactly; bool, integer or float, nonzero = valid; None: all), see
    reference/statistics.py."""
    op = "aggregate"
    checks.check_float(op, "per_token", per_token)
    if per_token.dim() < 1:
        raise ValueError(f"{op}: per_token must have shape [..., T], got {tuple(per_token.shape)}")
    mask = _checked_mask(op, per_token, mask, "per_token")
    _check_agg(op, agg, norm)
    return plain.aggregate(per_token, mask, agg, norm)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: Optional[torch.Tensor], *,
                       sum_over: SumOver = None) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over the valid entries (population variances):
    values, returns, mask [...] (one shape; mask None: all) -> 0-dim, NaN where the returns are
    constant."""
    op = "explained_variance"
    checks.check_float(op, "returns", returns)
    checks.check_float(op, "values", values)
    checks.check_same_shape(op, "values", values, "returns", returns)
    mask = checks.mask_arg(op, mask, "returns", returns)
    returns_var = plain.masked_moments(returns, mask, unbiased=False,
                                       sum_over=sum_over)[1].reshape(())
    error_var = plain.masked_moments(returns - values, mask, unbiased=False,
                                     sum_over=sum_over)[1].reshape(())
    return torch.where(returns_var > 0, 1.0 - error_var / returns_var, float("nan"))


def clip_fractions(log_ratio: torch.Tensor, advantages: torch.Tensor, mask: Optional[torch.Tensor],
                   clip_low: float, clip_high: float) -> dict:
    """The two sides of PPO's clip fraction, over valid tokens (TRL's clip_ratio/low_mean and
    high_mean): clipfrac_low where r < 1 - clip_low with A < 0, clipfrac_high where
    r > 1 + clip_high with A > 0. log_ratio, advantages, mask [..., T] -> detached 0-dim fp32."""
    with torch.no_grad():
        ratio = log_ratio.float().exp()
        low = (ratio < 1.0 - clip_low) & (advantages < 0)
        high = (ratio > 1.0 + clip_high) & (advantages > 0)
        return {"clipfrac_low": plain.masked_mean(low.float(), mask),
                "clipfrac_high": plain.masked_mean(high.float(), mask)}


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


def check_is_options(op: str, mode: str, level: str, cap: float, low: float, high: float, *,
                     prefix: str = "") -> None:
    """The IS correction's options, named as the op's arguments are (`prefix` + mode, ...)."""
    checks.check_choice(op, f"{prefix}mode", mode, IS_MODES)
    checks.check_choice(op, f"{prefix}level", level, IS_LEVELS)
    if not 0 < low <= 1 <= high or cap < 1:
        raise ValueError(
            f"{op}: need 0 < {prefix}low <= 1 <= {prefix}high and {prefix}cap >= 1, got "
            f"{prefix}low={low}, {prefix}high={high}, {prefix}cap={cap}")


def sequence_ratio_logp(logp: torch.Tensor, old_logp: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """logp [..., T] -> fp32 [..., T] whose log-ratio against old_logp is the sequence's mean
    log-ratio (value) and whose gradient w.r.t. logp is 1 (GSPO, see above)."""
    # [..., 1]
    mean = plain.masked_mean(logp.float() - old_logp.float(), mask, dim=-1, keepdim=True)
    return old_logp.float() + mean.detach() + (logp.float() - logp.float().detach())


def importance_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, *,
                       mode: str, level: str, cap: float, low: float, high: float
                       ) -> tuple[Optional[torch.Tensor], torch.Tensor, dict]:
    """(advantage scale [..., T] or None, kept mask [..., T] bool, stats) of the IS correction:
    the scale min(w, cap) for "tis", the tokens inside [low, high] for "mis" (the one definition
    of the masked-IS mask: the update's aggregation units and the loss's torch paths take it).

    stats (detached 0-dim fp32, over valid tokens): is_weight_mean and is_weight_max of the raw
    weights w, and is_masked_frac, the fraction of valid tokens the correction dropped (mis).
    old_logp, rollout_logp and mask (bool, integer or float) have one shape.
    """
    op = "importance_weights"
    checks.check_float(op, "old_logp", old_logp)
    checks.check_float(op, "rollout_logp", rollout_logp)
    checks.check_same_shape(op, "rollout_logp", rollout_logp, "old_logp", old_logp)
    mask = checks.mask_arg(op, mask, "old_logp", old_logp, optional=False)
    check_is_options(op, mode, level, cap, low, high)
    valid = mask != 0
    log_w = torch.where(valid, old_logp.float() - rollout_logp.float(), 0.0)
    if level == "sequence":
        log_w = log_w.sum(dim=-1, keepdim=True).expand_as(log_w)
    w = torch.exp(log_w.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)).detach()
    stats = {"is_weight_mean": plain.masked_mean(w, valid),
             "is_weight_max": torch.where(valid, w, 0.0).amax() if w.numel() else w.new_zeros(())}
    if mode == "tis":
        stats["is_masked_frac"] = w.new_zeros(())
        return torch.where(valid, w.clamp(max=cap), 0.0), valid, stats
    keep = valid & (w >= low) & (w <= high)
    stats["is_masked_frac"] = plain.masked_mean((valid & ~keep).float(), valid)
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
    if valid is not None:  # the device (the shape is checked above)
        checks.check_same_shape("group_advantages", "valid", valid, "scores", scores)
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    # Reads values: a sync per call on a GPU, and a branch on data torch.compile cannot trace.
    if sync_checks_enabled(scores) and not torch.isfinite(scores[valid]).all():
        raise ValueError(
            "group_advantages: scores must be finite (drop the rows with a non-finite score first)")
    s = torch.where(valid, scores.float(), 0.0)
    count = valid.sum(dim=1, keepdim=True)                                 # [P, 1]
    mean, var = plain.masked_moments(s, valid, dim=1)                      # [P, 1] each, unbiased
    centered = torch.where(valid, s - mean, 0.0)
    if estimator == "grpo":  # verl's normalizer: std + eps, not whitening's sqrt(var + eps)
        return centered / (var.sqrt() + eps)
    if estimator == "rloo":  # s - (sum - s) / (k - 1)
        return centered * count / (count - 1).clamp_min(1)
    if estimator == "dr_grpo":
        return centered
    batch_mean, batch_var = plain.masked_moments(centered, valid, sum_over=sum_over)
    return torch.where(valid, (centered - batch_mean) / (batch_var.sqrt() + eps), 0.0)
