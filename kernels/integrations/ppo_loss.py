"""What no host's fused losses ship, at the same call shape as FusedLinearGRPOLoss: the clipped PPO
policy loss from hidden states with an entropy bonus and a KL term, and advantages for a host's
uneven groups (verl's uid array). The value loss, GAE and whitening are the kernels' own
(ppo_value_loss, gae, masked_whiten), which take a host's float masks as they are."""
from __future__ import annotations

from typing import Optional

import torch

from ..rl.kl import ESTIMATORS, kl_penalty
from ..rl.linear_logprobs import linear_token_logprobs
from ..rl.ppo_loss import ppo_policy_loss
from ..rl.statistics import AGGS, aggregate, masked_mean
from .grpo_loss import IGNORE_INDEX

UID_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


class FusedLinearPPOLoss(torch.nn.Module):
    """PPO's clipped policy loss from the LM head's hidden states: aggregate of
    max(-A r, -A clip(r, 1 - clip_eps, 1 + clip_eps_high)) - entropy_coef * entropy + kl_coef * KL,
    the three aggregated by ``agg`` (statistics.AGGS) over the mask.

    Constructor: clip_eps, clip_eps_high (None: clip_eps), dual_clip, entropy_coef, kl_coef,
    kl_estimator ("k1", "k2", "k3"), agg, loss_agg_norm, temperature, chunk_size (rows, None: the
    byte budget), logit_scale and softcap (linear_token_logprobs's).
    """

    def __init__(self, clip_eps: float = 0.2, clip_eps_high: Optional[float] = None,
                 dual_clip: Optional[float] = None, entropy_coef: float = 0.0,
                 kl_coef: float = 0.0, kl_estimator: str = "k3", agg: str = "token-mean",
                 loss_agg_norm: Optional[float] = None, temperature: float = 1.0,
                 chunk_size: Optional[int] = None, logit_scale: float = 1.0,
                 softcap: Optional[float] = None):
        super().__init__()
        if agg not in AGGS or kl_estimator not in ESTIMATORS:
            raise ValueError(f"FusedLinearPPOLoss: agg must be one of {AGGS} and kl_estimator one "
                             f"of {ESTIMATORS}, got {agg!r} and {kl_estimator!r}")
        self.clip = dict(clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip)
        self.entropy_coef, self.kl_coef, self.kl_estimator = entropy_coef, kl_coef, kl_estimator
        self.agg, self.loss_agg_norm = agg, loss_agg_norm
        self.head = dict(temperature=temperature, chunk_size=chunk_size, logit_scale=logit_scale,
                         softcap=softcap)

    def forward(self, _input: torch.Tensor, lin_weight: torch.Tensor,
                selected_token_ids: torch.Tensor, attention_mask: torch.Tensor,
                advantages: torch.Tensor, old_per_token_logps: torch.Tensor,
                bias: Optional[torch.Tensor] = None,
                ref_per_token_logps: Optional[torch.Tensor] = None):
        """(loss [], stats dict of 0-dim tensors): _input [B, T, H], lin_weight [V, H],
        selected_token_ids, attention_mask, old_per_token_logps [B, T], advantages [B, T] (or
        [B], [B, 1]), optional bias [V] and ref_per_token_logps [B, T] (needed when kl_coef != 0).
        stats: ppo_policy_loss's (clip_sides on), entropy, and kl with kl_coef."""
        if self.kl_coef != 0.0 and ref_per_token_logps is None:
            raise ValueError("FusedLinearPPOLoss: kl_coef != 0 needs ref_per_token_logps")
        mask = attention_mask != 0
        labels = torch.where(mask, selected_token_ids, IGNORE_INDEX)
        logp, entropy = linear_token_logprobs(_input, lin_weight, labels, bias=bias,
                                              return_entropy=True, **self.head)
        loss, stats = ppo_policy_loss(logp, old_per_token_logps, advantages, mask, agg=self.agg,
                                      loss_agg_norm=self.loss_agg_norm, clip_sides=True,
                                      **self.clip)
        stats["entropy"] = masked_mean(entropy.detach(), mask)
        if self.entropy_coef != 0.0:
            loss = loss - self.entropy_coef * aggregate(entropy, mask, self.agg,
                                                        self.loss_agg_norm)
        if self.kl_coef != 0.0:
            kl = kl_penalty(logp, ref_per_token_logps.detach(), estimator=self.kl_estimator,
                            mask=mask)
            loss = loss + self.kl_coef * aggregate(kl, mask, self.agg, self.loss_agg_norm)
            stats["kl"] = masked_mean(kl.detach(), mask)
        return loss, stats


def group_advantages_by_uid(scores: torch.Tensor, uids, *, estimator: str = "grpo",
                            eps: float = 1e-6) -> torch.Tensor:
    """scores [N] (one per response) and uids (N prompt ids: a list, numpy array or tensor; the
    groups may be uneven and interleaved) -> fp32 advantages [N], verl's definitions
    (compute_grpo_outcome_advantage, compute_rloo_outcome_advantage):
        grpo     (s - group mean) / (unbiased group std + eps)
        dr_grpo  s - group mean (verl's norm_adv_by_std_in_grpo=False)
        rloo     s - mean of the group's other responses, i.e. (s - mean) * n / (n - 1)
    A group of one response keeps its score (verl: mean 0, std 1) for grpo and dr_grpo and gets
    0 for rloo."""
    if estimator not in UID_ESTIMATORS:
        raise ValueError(f"group_advantages_by_uid: unknown estimator {estimator!r}; expected one "
                         f"of {UID_ESTIMATORS}")
    if scores.dim() != 1 or len(uids) != scores.shape[0]:
        raise ValueError(f"group_advantages_by_uid: scores must be [N] with N uids, got scores "
                         f"{tuple(scores.shape)} and {len(uids)} uids")
    _, group = _unique_inverse(uids)
    group = group.to(scores.device)
    s = scores.float()
    n_groups = int(group.max()) + 1 if group.numel() else 0
    count = torch.zeros(n_groups, device=s.device).index_add_(0, group, torch.ones_like(s))
    mean = torch.zeros(n_groups, device=s.device).index_add_(0, group, s) / count
    centered = s - mean[group]
    n = count[group]
    alone = n < 2
    if estimator == "rloo":
        return torch.where(alone, 0.0, centered * n / (n - 1).clamp(min=1))
    if estimator == "dr_grpo":
        return torch.where(alone, s, centered)
    squares = torch.zeros(n_groups, device=s.device).index_add_(0, group, centered**2)
    std = (squares / (count - 1).clamp(min=1)).sqrt()[group]
    return torch.where(alone, s, centered / (std + eps))


def _unique_inverse(uids) -> tuple[list, torch.Tensor]:
    """(the distinct uids, each entry's group index [N] int64), in order of first appearance."""
    keys = uids.tolist() if hasattr(uids, "tolist") else list(uids)
    index: dict = {}
    group = [index.setdefault(key, len(index)) for key in keys]
    return list(index), torch.tensor(group, dtype=torch.int64)
