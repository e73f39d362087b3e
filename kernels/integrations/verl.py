"""verl in one line: ``fusedrl.kernels.integrations.verl.register()`` in each process that runs
verl code: the driver, and every Ray worker through verl's own import hook
(VERL_USE_EXTERNAL_MODULES or external_lib naming fusedrl.kernels.integrations.verl_worker, which
registers when imported). It installs, with verl's own signatures:
  linear_cross_entropy   verl.utils.kernel.linear_cross_entropy.linear_cross_entropy (its fused
                         head, imported at call time by verl's models): ours, (logp, entropy)
  "fusedrl"              a policy loss (actor.policy_loss.loss_mode): verl's vanilla PPO (dual
                         clip at clip_ratio_c, rollout_is_weights, agg_loss's normalizers) on our
                         kernel
  "fusedrl_gae"          an advantage estimator: GAE, then whitened over the response mask
  "fusedrl_grpo"         an advantage estimator: GRPO over the uid groups of ``index``
Importing this module imports nothing of verl; register() does (verl must be installed).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from ..rl.advantages import gae
from ..rl.linear_logprobs import linear_token_logprobs
from ..rl.ppo_loss import ppo_policy_loss
from ..rl.statistics import masked_mean
from ..rl.whiten import masked_whiten
from .ppo_loss import group_advantages_by_uid


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         temperature: float = 1.0, reduction: str = "none",
                         dist_process_group=None):
    """verl's fused head: (log-probs, entropy) of labels [...] from hidden [..., H] through
    weight [V, H], each of labels' shape (reduction "none"), or their sums ("sum") or means
    ("mean"). A vocabulary split over a process group of more than one rank is refused."""
    if dist_process_group is not None and dist_process_group.size() > 1:
        raise ValueError("fusedrl linear_cross_entropy: a vocabulary-parallel dist_process_group "
                         f"({dist_process_group.size()} ranks) is not supported; gather the head "
                         "or leave verl's kernel in place")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"fusedrl linear_cross_entropy: reduction must be 'none', 'sum' or "
                         f"'mean', got {reduction!r}")
    logp, entropy = linear_token_logprobs(hidden, weight, labels, temperature=float(temperature),
                                          return_entropy=True)
    if reduction == "none":
        return logp, entropy
    reduce = torch.sum if reduction == "sum" else torch.mean
    return reduce(logp), reduce(entropy)


def verl_aggregation(mask: torch.Tensor, mode: str, dp_size: int = 1,
                     batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None
                     ) -> tuple[str, Optional[float], float]:
    """(agg, loss_agg_norm, scale) giving verl's agg_loss(loss_mat, mask, mode,
    **global_batch_info) as scale * aggregate(loss_mat, mask, agg, norm)."""
    rows = float((mask != 0).any(dim=-1).sum())
    if mode == "token-mean":
        if batch_num_tokens is None:
            return "token-mean", None, 1.0
        return "token-sum", None, dp_size / float(batch_num_tokens)
    if mode == "token-sum":
        return "token-sum", None, float(dp_size)
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        seqs = rows if global_batch_size is None else float(global_batch_size)
        scale = dp_size / max(seqs, 1.0) if global_batch_size is not None else 1.0 / max(seqs, 1.0)
        if mode == "seq-mean-token-mean":
            return "seq-mean-token-mean", None, scale * rows
        norm = float(loss_scale_factor or mask.shape[-1]) if mode.endswith("-norm") else 1.0
        return "token-sum", None, scale / norm
    raise ValueError(f"fusedrl policy loss: unknown loss_agg_mode {mode!r}")


def compute_policy_loss_fusedrl(old_log_prob, log_prob, advantages, response_mask,
                                loss_agg_mode: str = "token-mean", config=None,
                                rollout_is_weights=None):
    """verl's compute_policy_loss_vanilla on our kernel: (loss, metrics) with metrics
    actor/pg_clipfrac, actor/ppo_kl, actor/pg_clipfrac_lower. config: verl's ActorConfig
    (clip_ratio, clip_ratio_low/high, clip_ratio_c, global_batch_info)."""
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    dual = config.get("clip_ratio_c", 3.0)
    if rollout_is_weights is not None:   # the surrogate is linear in A for a positive weight
        advantages = advantages * rollout_is_weights.detach()
    agg, norm, scale = verl_aggregation(response_mask, loss_agg_mode,
                                        **dict(getattr(config, "global_batch_info", {}) or {}))
    loss, stats = ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask,
                                  clip_eps=low, clip_eps_high=high, dual_clip=dual, agg=agg,
                                  loss_agg_norm=norm)
    log_ratio = (log_prob.detach() - old_log_prob).clamp(-20.0, 20.0)
    metrics = {"actor/pg_clipfrac": stats["clipfrac"].item(),
               "actor/ppo_kl": masked_mean(-log_ratio, response_mask).item(),
               "actor/pg_clipfrac_lower": stats["dual_clipfrac"].item()}
    return loss * scale, metrics


def compute_gae_advantage_return_fusedrl(token_level_rewards, values, response_mask, gamma,
                                         lam, **_):
    """verl's compute_gae_advantage_return: (advantages whitened over the mask, returns) [bs, T],
    equal to verl's on the valid positions (0 outside them)."""
    advantages, returns = gae(token_level_rewards, values, response_mask, gamma=float(gamma),
                              lam=float(lam))
    return masked_whiten(advantages, response_mask), returns


def compute_grpo_outcome_advantage_fusedrl(token_level_rewards, response_mask, index,
                                           epsilon: float = 1e-6,
                                           norm_adv_by_std_in_grpo: bool = True, config=None,
                                           **_):
    """verl's compute_grpo_outcome_advantage: each response's summed reward against its uid
    group (``index``, uneven groups allowed) -> (advantages, returns) [bs, T], the score spread
    over the response mask."""
    if config is not None and hasattr(config, "get"):
        norm_adv_by_std_in_grpo = config.get("norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo)
    scores = token_level_rewards.sum(dim=-1)
    estimator = "grpo" if norm_adv_by_std_in_grpo else "dr_grpo"
    advantages = group_advantages_by_uid(scores, index, estimator=estimator, eps=epsilon)
    spread = advantages[:, None] * response_mask
    return spread, spread


def register() -> None:
    """Install our head, policy loss and advantage estimators into verl in this process (see the
    module docstring): verl's modules already imported that bound verl's head by name get ours
    too. Needs verl importable; safe to call more than once."""
    try:
        from verl.trainer.ppo import core_algos
        from verl.utils.kernel import linear_cross_entropy as verl_head
    except ImportError as error:
        raise ImportError(f"fusedrl.kernels.integrations.verl.register(): verl is not "
                          f"importable here ({error})") from error
    theirs = verl_head.linear_cross_entropy
    if theirs is not linear_cross_entropy:
        for name, module in list(sys.modules.items()):
            if name.startswith("verl.") and getattr(module, "linear_cross_entropy", None) is theirs:
                module.linear_cross_entropy = linear_cross_entropy
    verl_head.linear_cross_entropy = linear_cross_entropy
    core_algos.register_policy_loss("fusedrl")(compute_policy_loss_fusedrl)
    core_algos.register_adv_est("fusedrl_gae")(compute_gae_advantage_return_fusedrl)
    core_algos.register_adv_est("fusedrl_grpo")(compute_grpo_outcome_advantage_fusedrl)
