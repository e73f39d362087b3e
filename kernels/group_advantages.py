"""Group-relative advantages of critic-free RL: each prompt's n sampled responses are scored against
each other (plain PyTorch: [P, n] is tiny next to a rollout's token tensors, so a kernel would not
earn its place)."""
from __future__ import annotations

import torch

from .reference import masked_moments

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


def group_advantages(scores: torch.Tensor, *, estimator: str, eps: float = 1e-6) -> torch.Tensor:
    """scores [P, n] (n responses per prompt) -> fp32 advantages [P, n].

    grpo: (s - group mean) / (group std + eps), unbiased std (verl compute_grpo_outcome_advantage);
    dr_grpo: s - group mean (Dr. GRPO drops the std); rloo: s - mean of the other n - 1 (verl
    compute_rloo_outcome_advantage); reinforce_pp_baseline: s - group mean, then whitened over the
    batch (verl compute_reinforce_plus_plus_baseline_outcome_advantage). A group whose scores are
    all equal gets advantage 0. Needs n >= 2 and finite scores (drop non-finite rows first).
    """
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"group_advantages: unknown estimator {estimator!r}; expected one of {GROUP_ESTIMATORS}")
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"group_advantages: scores must be [P, n] with n >= 2 responses per prompt, "
                         f"got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("group_advantages: scores must be finite (drop the rows with a non-finite score first)")
    s = scores.float()
    n = s.shape[1]
    mean, var = masked_moments(s, None, dim=1)                             # [P, 1] each, unbiased
    if estimator == "grpo":  # verl's normalizer: std + eps, not whitening's sqrt(var + eps)
        return (s - mean) / (var.sqrt() + eps)
    if estimator == "rloo":
        return (s - mean) * n / (n - 1)      # s - (sum - s) / (n - 1)
    centered = s - mean
    if estimator == "dr_grpo" or centered.numel() < 2:
        return centered
    batch_mean, batch_var = masked_moments(centered, None)
    return (centered - batch_mean) / (batch_var.sqrt() + eps)
