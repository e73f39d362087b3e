"""What ppo_policy_loss does to its inputs before the fused pass, on every backend: GSPO's
sequence-level ratio and the importance-sampling correction between the sampler's log-probs and
the old (training-forward) log-probs. Both are a few elementwise ops on [..., T] tensors.

GSPO (Zheng et al. 2025), in verl's token-level form (compute_policy_loss_gspo): every token of a
sequence gets the log-ratio s = mean over the sequence's valid tokens of (logp - old_logp), as a
value, with gradient 1 with respect to its own logp: logp_eff = old_logp + sg(s) + logp - sg(logp).
With agg="seq-mean-token-mean" this is GSPO's objective and gradient (s_i / |y_i| per token).

Importance sampling (the sampler's distribution pi_rollout differs from the training forward's
pi_old: other kernels, batch composition), w = pi_old / pi_rollout per token, or the product over
the sequence's valid tokens at level="sequence" (exp of the summed log-ratio):
    "tis"  truncated IS: the per-token loss is scaled by min(w, cap)      (advantages * min(w, cap))
    "mis"  masked IS (IcePop's band): tokens (or whole sequences) with w outside [low, high] leave
           the loss and its aggregation counts; the others keep weight 1
Log-ratios are clamped to +-20 before exp(), as verl and OpenRLHF do.
"""
from __future__ import annotations

from typing import Optional

import torch

IS_MODES = ("tis", "mis")
IS_LEVELS = ("token", "sequence")
LOG_RATIO_LIMIT = 20.0


def sequence_ratio_logp(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logp [..., T] -> fp32 [..., T] whose log-ratio against old_logp is the sequence's mean
    log-ratio (value) and whose gradient w.r.t. logp is 1 (GSPO, see the module docstring)."""
    valid = mask != 0
    log_ratio = torch.where(valid, logp.float() - old_logp.float(), 0.0)
    mean = log_ratio.sum(dim=-1, keepdim=True) / valid.sum(dim=-1, keepdim=True).clamp_min(1)    # [..., 1]
    return old_logp.float() + mean.detach() + (logp.float() - logp.float().detach())


def importance_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, *,
                       mode: str, level: str, cap: float, low: float, high: float
                       ) -> tuple[Optional[torch.Tensor], torch.Tensor, dict]:
    """(advantage scale [..., T] or None, mask [..., T] bool, stats) of the IS correction.

    stats (detached 0-dim fp32, over valid tokens): is_weight_mean and is_weight_max of the raw
    weights w, and is_masked_frac, the fraction of valid tokens the correction dropped (mis).
    """
    valid = mask != 0
    log_w = torch.where(valid, old_logp.float() - rollout_logp.float(), 0.0)
    if level == "sequence":
        log_w = log_w.sum(dim=-1, keepdim=True).expand_as(log_w)
    w = torch.exp(log_w.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)).detach()
    count = valid.sum().clamp_min(1)
    stats = {"is_weight_mean": torch.where(valid, w, 0.0).sum() / count,
             "is_weight_max": torch.where(valid, w, 0.0).amax() if w.numel() else w.new_zeros(())}
    if mode == "tis":
        stats["is_masked_frac"] = w.new_zeros(())
        return torch.where(valid, w.clamp(max=cap), 0.0), valid, stats
    keep = valid & (w >= low) & (w <= high)
    stats["is_masked_frac"] = (valid & ~keep).sum() / count
    return None, keep, stats
