"""The RL statistics built on the masked statistics and loss aggregation rules of
reference/statistics.py (plain PyTorch, imported here under their names): the value function's
explained variance, the policy-ratio corrections (GSPO, importance sampling) and the
group-relative advantages of critic-free RL. Every other module, the engine's included, takes its
statistics from here; the one fast path is masked_whiten's Triton kernels (whiten.py), the same
numbers to fp32 rounding.

Computed in float64 for float64 inputs (the oracle's precision, see reference/rl.py), in float32
otherwise; differentiated by autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..reference.statistics import (AGGS, SumFn, SumOver, aggregate, aggregation_rule,
                                    compute_dtype, masked_mean, masked_moments, masked_whiten,
                                    row_weights, summing, valid_entries, weighted_sum)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: Optional[torch.Tensor], *,
                       sum_over: SumOver = None) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over the valid entries (population variances):
    values, returns, mask [...] -> 0-dim, NaN where the returns are constant."""
    returns_var = masked_moments(returns, mask, unbiased=False, sum_over=sum_over)[1].reshape(())
    error_var = masked_moments(returns - values, mask, unbiased=False,
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
        return {"clipfrac_low": masked_mean(low.float(), mask),
                "clipfrac_high": masked_mean(high.float(), mask)}


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
