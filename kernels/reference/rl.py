"""Plain PyTorch references of the RL ops (token log-probs, KL, GAE, the PPO losses), re-exported by
the package as ``fusedrl.kernels.reference.<op>``.

They compute in float64 when given float64 inputs and in float32 otherwise, and take the same
arguments as the public ops (validated there, not here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .statistics import aggregate, compute_dtype, masked_mean, valid_entries


def token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """log_softmax(logits / temperature)[label] (and the entropy), 0 where label == ignore_index.

    logits [..., V], labels [...] -> logp [...] (and entropy [...]).
    """
    z = logits.to(compute_dtype(logits)) / temperature                     # [..., V]
    logsm = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    index = torch.where(valid, labels, 0).long().unsqueeze(-1)
    logp = torch.where(valid, logsm.gather(-1, index).squeeze(-1), 0.0)
    if not return_entropy:
        return logp
    # p * log p is 0 * -inf where a logit is -inf: take those terms as 0 (their limit) before the
    # product so that neither the value nor the gradient turns into NaN.
    finite_logsm = logsm.masked_fill(torch.isneginf(logsm), 0.0)
    entropy = -(logsm.exp() * finite_logsm).sum(dim=-1)
    return logp, torch.where(valid, entropy, 0.0)


def linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, logit_scale=1.0, softcap=None):
    """token_logprobs(z): z = hidden @ weight.T + bias, times logit_scale, soft-capped to
    softcap * tanh(z / softcap) when softcap is given (Gemma-2's final_logit_softcapping).
    hidden [..., H], weight [V, H], labels [...].

    The matmul runs in the inputs' dtype, as a model's LM head would; the [N, V] logits exist.
    """
    logits = F.linear(hidden, weight, bias).to(compute_dtype(hidden)) * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                          return_entropy=return_entropy)


def kl_penalty(logp, ref_logp, *, estimator="k1", mask=None, clamp=None, log_ratio_clamp=None):
    """Per-token KL(pi || ref) estimate from log-probs of sampled tokens; 0 outside the mask. The
    log-ratio is clamped to +-log_ratio_clamp first and the estimate to +-clamp last (None: off);
    where either clamp is active the gradients are 0."""
    cd = compute_dtype(logp)
    logp, ref_logp = logp.to(cd), ref_logp.to(cd)
    if log_ratio_clamp is not None:
        # Where |ref - logp| exceeds the bound, constants with the clamped log-ratio stand in for
        # both: the estimate sees the clamped value and its gradients there are 0.
        d = (ref_logp - logp).detach()
        clamped = d.abs() > log_ratio_clamp
        logp = torch.where(clamped, ref_logp.detach() - d.clamp(-log_ratio_clamp, log_ratio_clamp),
                           logp)
        ref_logp = torch.where(clamped, ref_logp.detach(), ref_logp)
    log_ratio = ref_logp - logp                                             # log(ref / pi)
    if estimator == "k1":
        kl = -log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio**2
    else:
        kl = log_ratio.exp() - log_ratio - 1.0
    kl = torch.where(valid_entries(mask, logp), kl, 0.0)
    return kl if clamp is None else kl.clamp(-clamp, clamp)


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """Generalized advantage estimation, one time step at a time (the loop TRL/OpenRLHF run).

    rewards, values, mask [B, T] -> (advantages, returns) [B, T]. Invalid positions are skipped:
    they get 0 and the recursion bootstraps from the next valid position; after the last valid
    token the value is 0 (terminal).
    """
    cd = compute_dtype(rewards)
    rewards, values = rewards.to(cd), values.to(cd)
    valid = valid_entries(mask, rewards)
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(rewards.shape[:-1])                     # [B]; T may be 0
    next_advantage = rewards.new_zeros(rewards.shape[:-1])
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        advantage = delta + gamma * lam * next_advantage
        ok = valid[..., t]
        advantages[..., t] = torch.where(ok, advantage, 0.0)
        next_value = torch.where(ok, values[..., t], next_value)
        next_advantage = torch.where(ok, advantage, next_advantage)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


def policy_terms(logp, old_logp, advantages, *, clip_low=0.2, clip_high=0.2, dual_clip=None,
                 log_ratio_clamp=20.0):
    """Per-token PPO-clip terms [..., T] in the compute dtype: (loss, log_ratio, ratio, clipped,
    dual_clipped) with max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), bounded by -A * dual_clip
    for A < 0, the log-ratio clamped to +-log_ratio_clamp before exp()."""
    cd = compute_dtype(logp)
    logp, old_logp, advantages = logp.to(cd), old_logp.to(cd), advantages.to(cd)
    log_ratio = (logp - old_logp).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual_active = (advantages < 0) & (bound < per_token)
        per_token = torch.where(dual_active, bound, per_token)
    return per_token, log_ratio, ratio, clipped > unclipped, dual_active


def ppo_policy_loss(logp, old_logp, advantages, mask, *, clip_eps=0.2, clip_eps_high=None,
                    dual_clip=None, agg="token-mean", loss_agg_norm=None, log_ratio_clamp=20.0):
    """PPO-clip surrogate (policy_terms) aggregated by `agg`.

    logp, old_logp, advantages, mask [..., T] -> (loss [], stats of 0-dim tensors).
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    per_token, log_ratio, ratio, clipped, dual_active = policy_terms(
        logp, old_logp, advantages, clip_low=clip_eps, clip_high=eps_high, dual_clip=dual_clip,
        log_ratio_clamp=log_ratio_clamp)
    loss = aggregate(per_token, mask, agg, loss_agg_norm)
    cd = per_token.dtype
    with torch.no_grad():
        # ratio > 0, so a max over (ratio on valid, 0 elsewhere, one extra 0) is the max over valid
        # tokens, or 0 when there are none.
        masked_ratio = torch.where(valid_entries(mask, ratio), ratio, 0.0).flatten()
        stats = {
            "clipfrac": masked_mean(clipped.to(cd), mask),
            "dual_clipfrac": masked_mean(dual_active.to(cd), mask),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": F.pad(masked_ratio, (0, 1)).max(),
        }
    return loss, stats


def value_terms(values, old_values, returns, *, clip_eps=0.2):
    """Per-token clipped value terms [..., T]: (0.5 * max((v - R)^2, (clip(v, v_old +- eps) - R)^2),
    clipped); clip_eps=None: plain 0.5 * (v - R)^2."""
    cd = compute_dtype(values)
    values, old_values, returns = values.to(cd), old_values.to(cd), returns.to(cd)
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped_values = torch.maximum(torch.minimum(values, old_values + clip_eps),
                                   old_values - clip_eps)
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_value_loss(values, old_values, returns, mask, *, clip_eps=0.2, agg="token-mean",
                   loss_agg_norm=None):
    """Clipped value loss (value_terms) aggregated by `agg`: values, old_values, returns, mask
    [..., T] -> (loss, stats)."""
    per_token, clipped = value_terms(values, old_values, returns, clip_eps=clip_eps)
    loss = aggregate(per_token, mask, agg, loss_agg_norm)
    return loss, {"vf_clipfrac": masked_mean(clipped.to(per_token.dtype), mask).detach()}
