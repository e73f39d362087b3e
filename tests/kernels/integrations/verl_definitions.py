"""verl 0.9's definitions, transcribed from verl/trainer/ppo/core_algos.py (verl does not install
beside this environment's transformers: its pins and ray): the oracles of test_verl.py and
test_losses.py, in float64, loops where verl loops."""
import torch


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def masked_whiten(x, mask):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def grpo_outcome(scores, uids, eps=1e-6, by_std=True):
    """compute_grpo_outcome_advantage's loop on per-response scores."""
    groups = {}
    for i, uid in enumerate(uids):
        groups.setdefault(uid, []).append(scores[i])
    out = scores.clone()
    for i, uid in enumerate(uids):
        group = torch.stack(groups[uid])
        mean, std = (group.mean(), group.std()) if len(group) > 1 else (0.0, 1.0)
        out[i] = (scores[i] - mean) / (std + eps) if by_std else scores[i] - mean
    return out


def gae_advantage_return(rewards, values, mask, gamma, lam):
    """compute_gae_advantage_return."""
    nextvalues, lastgaelam, reversed_ = 0, 0, []
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * mask[:, t] + (1 - mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * mask[:, t] + (1 - mask[:, t]) * lastgaelam
        reversed_.append(lastgaelam)
    advantages = torch.stack(reversed_[::-1], dim=1)
    return masked_whiten(advantages, mask), advantages + values


def agg_loss(loss_mat, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
             loss_scale_factor=None):
    if mode == "token-mean":
        tokens = mask.sum() if batch_num_tokens is None else batch_num_tokens
        return (loss_mat * mask).sum() / tokens * dp_size
    if mode == "token-sum":
        return (loss_mat * mask).sum() * dp_size
    seq_mask = (mask.sum(-1) > 0).double()
    seqs = seq_mask.sum() if global_batch_size is None else global_batch_size
    if mode == "seq-mean-token-mean":
        seq_losses = (loss_mat * mask).sum(-1) / (mask.sum(-1) + 1e-8)
        return (seq_losses * seq_mask).sum() / seqs * dp_size
    loss = ((loss_mat * mask).sum(-1) * seq_mask).sum() / seqs * dp_size
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_scale_factor or mask.shape[-1])
    return loss


def policy_loss_vanilla(old, logp, adv, mask, mode, clip_low, clip_high, clip_c,
                        is_weights=None, **batch_info):
    """compute_policy_loss_vanilla: (loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)."""
    neg_kl = (logp - old).clamp(-20.0, 20.0)
    ratio = neg_kl.exp()
    losses1 = -adv * ratio
    losses2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    clip1 = torch.maximum(losses1, losses2)
    losses3 = -adv * clip_c
    clip2 = torch.min(losses3, clip1)
    losses = torch.where(adv < 0, clip2, clip1)
    if is_weights is not None:
        losses = losses * is_weights
    return (agg_loss(losses, mask, mode, **batch_info),
            masked_mean((losses2 > losses1).double(), mask), masked_mean(-neg_kl, mask),
            masked_mean((clip1 > losses3).double() * (adv < 0).double(), mask))
