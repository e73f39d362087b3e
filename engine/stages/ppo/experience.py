"""Experience building, between sampling and the update: scored samples -> a PPOBatch (reference
and old log-probs, values, shaped rewards, advantages) and its metrics. Critic-free estimators
(GRPO and kin) take each row's group-relative advantage instead of GAE over the critic's values.

Under torchrun each rank holds its share of the rollout's rows (the same number on every rank: rows
dropped on one rank are balanced by dropping as many whole groups on the others); statistics that
shape the update (score normalization, advantage whitening, the group baseline of
reinforce_pp_baseline, the KL that drives the controller) and the metrics are taken over all ranks:
fusedrl.kernels' statistics with `sum_over` the ranks' sum (distributed.data_parallel_sum).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...data.device_tensors import device_tensor
from ...parallel import distributed
from ...config.estimators import GROUP_ESTIMATORS
from ...config.ppo import PPOConfig
from ...train import runlog
from ....kernels import explained_variance, kl_penalty, masked_mean, masked_moments
from .advantages import RunningMoments, advantages_and_returns, finite_rows, shape_rewards
from .forwards import policy_forward, reference_logprobs
from ..rollout.group_advantages import group_token_advantages
from ..rollout.microbatches import forward_in_microbatches
from ..rollout.models import PPOModels
from ..rollout.phase_timer import PhaseTimer
from .batch import PPOBatch
from ..rollout.scored_rows import Samples
from ..rollout.turn_credit import place_turn_rewards, turn_returns, turn_token_advantages


@dataclass(frozen=True)
class ExperienceSettings:
    """What experience building reads of a PPOConfig (the fields' help is there)."""
    temperature: float              # rollout.temperature: log-probs at the sampling temperature
    # rollout.exact: old log-probs in the actor's batch-invariant mode
    exact: bool
    kl_estimator: str               # reward.kl_estimator: the per-token KL in the reward
    normalize_scores: bool          # reward.normalize: by the running moments of the scores
    score_clip: Optional[float]     # reward.clip
    estimator: str                  # ppo.estimator
    gamma: float                    # ppo.gamma
    lam: float                      # ppo.lam
    whiten_advantages: bool         # ppo.whiten_advantages (critic estimators)
    # rollout.tokens_per_forward: the scoring forwards' budget
    tokens_per_forward: Optional[int] = None
    turn_gamma: float = 1.0         # reward.turn_gamma (the samples hold per-turn rewards or not)
    turn_advantages: bool = False   # ppo.turn_advantages

    @classmethod
    def of(cls, cfg: PPOConfig) -> "ExperienceSettings":
        rollout, reward, ppo = cfg.rollout, cfg.reward, cfg.ppo
        return cls(rollout.temperature, rollout.exact, reward.kl_estimator, reward.normalize,
                   reward.clip, ppo.estimator, ppo.gamma, ppo.lam, ppo.whiten_advantages,
                   rollout.forward_tokens, reward.turn_gamma, ppo.turn_advantages)


@dataclass
class Experience:
    """An iteration's experience: the PPOBatch, or None with the reason when no row is left; the
    KL per sequence to the reference over all ranks (the KL controller and the ceiling read it;
    NaN without a rollout); the metrics to log."""
    rollout: Optional[PPOBatch]
    metrics: dict
    kl: float = math.nan
    skip_reason: Optional[str] = None


def make_rollout(models: PPOModels, samples: Samples, settings: ExperienceSettings, kl_coef: float,
                 moments: RunningMoments, timer: PhaseTimer) -> Experience:
    """Turn scored samples into a PPOBatch (reference and old log-probs, values, shaped rewards at
    KL coefficient `kl_coef`, advantages); `moments` normalize the scores with
    settings.normalize_scores (and are updated). Returns it with its KL and metrics (read with one
    host sync, besides the finite-score check's and, with settings.normalize_scores, the running
    moments').

    Rows whose score is not finite are dropped before anything else sees them (with a group
    estimator, their whole group; counted in `dropped_rows`); the PPOBatch is None when no row is
    left (every score non-finite, or dynamic sampling found no group to learn from), and
    `skip_reason` then says why. A row with no trained token (an agent trajectory that left the
    batch: engine/agents) needs no score: it stays, a sample of nothing (advantages.py).
    """
    group = samples.n if settings.estimator in GROUP_ESTIMATORS else None
    trained = samples.packed.grid_mask().any(dim=-1)                           # [R]
    read_scores = torch.where(trained, samples.scores, 0.0)
    # one host read for both: which rows' scores are finite, and which rows have a trained token
    finite, trained_rows = torch.stack([torch.isfinite(read_scores), trained]).tolist()
    keep = finite_rows(finite, group)
    unit = group or 1  # whole groups: every rank keeps as many rows as the rank that keeps fewest
    ranks = models.ranks  # a tensor group is one data rank
    keep = keep[:distributed.min_over_ranks(len(keep) // unit, ranks) * unit]
    dropped = distributed.all_reduce_sum({"dropped_rows": len(samples.responses) - len(keep),
                                          "drawn_rows": len(samples.responses),
                                          "trained_rows": sum(trained_rows[r] for r in keep)},
                                         ranks)
    if keep and not dropped["trained_rows"]:
        return Experience(None, {"dropped_rows": dropped["dropped_rows"]},
                          skip_reason="every trajectory left the batch (env/errors)")
    if not keep:
        reason = ("no prompt group had scores that differ (dynamic sampling)"
                  if not dropped["drawn_rows"]
                  else non_finite_reason(read_scores, group) if distributed.world_size() == 1
                  else "some rank had no finite score left (ranks keep equal numbers of rows)")
        return Experience(None, {"dropped_rows": dropped["dropped_rows"]}, skip_reason=reason)
    if len(keep) < len(samples.responses):
        samples = samples.take_rows(keep)
    packed = samples.packed
    mask = packed.grid_mask()                                                  # [R, T]
    scores = samples.scores
    with timer.phase("reference"):
        ref_logp = forward_in_microbatches(
            packed, settings.tokens_per_forward,
            lambda micro: reference_logprobs(models, micro, settings.temperature), ranks)
    with timer.phase("old"), torch.no_grad():
        old_logp, entropy, old_values = forward_in_microbatches(
            packed, settings.tokens_per_forward,
            lambda micro: policy_forward(models, micro, settings.temperature, with_entropy=True,
                                         exact=settings.exact), ranks)
    kl = kl_penalty(old_logp, ref_logp, estimator=settings.kl_estimator, mask=mask)
    sum_over = distributed.data_parallel_sum(ranks)
    shaped = (distributed.own_rows(moments.normalize(distributed.gather_rows(scores, ranks)), ranks)
              if settings.normalize_scores else scores)
    if settings.score_clip is not None:
        shaped = shaped.clamp(-settings.score_clip, settings.score_clip)
    rewards, turn_returns = shaped_rewards(samples, shaped, kl, mask, kl_coef, settings.turn_gamma)
    with_values = old_values is not None
    if not with_values and settings.turn_advantages:  # each turn a unit of its group's statistics
        advantages = turn_token_advantages(turn_returns, samples.turn_spans, mask, samples.n,
                                           settings.estimator)
        old_values = returns = torch.zeros_like(advantages)
    elif not with_values:  # critic-free: each row's group-relative advantage on all its tokens
        advantages = group_token_advantages(shaped, mask, samples.n, settings.estimator,
                                            sum_over=sum_over)
        old_values = returns = torch.zeros_like(advantages)
    else:
        advantages, returns = advantages_and_returns(
            rewards, old_values, mask, estimator=settings.estimator, gamma=settings.gamma,
            lam=settings.lam, whiten=settings.whiten_advantages, sum_over=sum_over)
    rollout = PPOBatch(packed, mask, samples.sampler_logprobs, old_logp, ref_logp, old_values,
                      scores, rewards, advantages, returns)
    metrics = {**rollout_metrics(rollout, kl, entropy, with_values, timer, ranks),
               # What one forward over the rows reads, each shared prompt once
               # (train.prefix_sharing), and the rows' own tokens: their ratio is the saving.
               **applied_metrics(samples, ranks, models.policy.context_parallel)}
    return Experience(rollout,
                      {**metrics, "kl_coef": kl_coef, "dropped_rows": dropped["dropped_rows"]},
                      kl=metrics["kl"])


def shaped_rewards(samples: Samples, shaped: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float, turn_gamma: float) -> tuple[torch.Tensor, list | None]:
    """Per-token rewards [R, T] of the rollout (core.shape_rewards: the score at each row's last
    token) and, with per-turn rewards (reward.per_turn), each environment reward at its turn's
    last model token instead, the rest of the score (reward functions, overlong shaping) at the
    last token; then also each row's per-turn returns to go (the rest counted in the last turn's
    reward), else None."""
    if samples.turn_rewards is None:
        return shape_rewards(kl, shaped, mask, kl_coef), None
    env = [turn_returns(x, turn_gamma)[0] if x else 0.0 for x in samples.turn_rewards]
    rest = shaped - device_tensor(env, shaped.dtype, shaped.device)
    rewards = place_turn_rewards(shape_rewards(kl, rest, mask, kl_coef), samples.turn_spans,
                                 samples.turn_rewards)
    rests = rest.tolist()
    per_row = [turn_returns(x[:-1] + [x[-1] + extra], turn_gamma) if x else []
               for x, extra in zip(samples.turn_rewards, rests)]
    return rewards, per_row


def applied_metrics(samples: Samples, ranks: distributed.DataRanks, context=None) -> dict:
    """What the options did to these rows, summed over the data `ranks`: the tokens one forward
    reads (each shared prompt once) and the rows' own, prefix/tokens_saved (prompt tokens
    forwarded once for their group: train.prefix_sharing), overlong/penalized (answers that
    lost score to overlong shaping), routing/replayed_tokens (tokens the training forwards route
    as the sampler did: rollout.routing_replay) and, with `context` (the policy's
    ContextParallel), context/size and context/tokens_per_rank (the tokens of the pack one rank
    of a context group forwards, the mean over the data ranks)."""
    packed = samples.packed
    penalized = sum(p < 0 for p in samples.penalties or ())
    counts = {"forwarded_tokens": packed.forwarded_tokens, "row_tokens": sum(packed.seqlens),
              "overlong/penalized": penalized}
    if packed.routing is not None:  # a token has its records on every sparse layer or on none
        counts["routing/replayed_tokens"] = int((packed.routing[:, 0, 0] >= 0).sum())
    if context is not None:
        counts["context/tokens_per_rank"] = -(-packed.forwarded_tokens // context.size)
    sums = distributed.all_reduce_sum(counts, ranks)
    sums["prefix/tokens_saved"] = sums["row_tokens"] - sums["forwarded_tokens"]
    if context is not None:
        sums["context/size"] = context.size
        sums["context/tokens_per_rank"] /= ranks.size()
    return sums


def non_finite_reason(scores: torch.Tensor, group: int | None) -> str:
    """Why no row of `scores` [R] is left (finite_rows kept none): how many scores were NaN or inf,
    and with `group` (a group estimator's group size) that each took its whole group with it."""
    bad, drawn = int((~torch.isfinite(scores)).sum()), scores.numel()
    if bad == drawn:
        return f"all {drawn} scores were NaN or inf"
    were = "was" if bad == 1 else "were"
    return (f"{bad} of {drawn} scores {were} NaN or inf, and each drops its whole group of {group} "
            "(the group estimator's baseline needs every score): no group was left")


def rollout_metrics(rollout: PPOBatch, kl: torch.Tensor, entropy: torch.Tensor, with_values: bool,
                    timer: PhaseTimer, ranks: distributed.DataRanks = distributed.WORLD) -> dict:
    """The rollout's metrics over all (data) `ranks`: computed on the device in float64, read with
    one host sync."""
    sum_over, mask = distributed.data_parallel_sum(ranks), rollout.mask

    def mean(x, valid=None):
        return masked_mean(x.double(), valid, sum_over=sum_over)

    def std(x, valid=None):
        return masked_moments(x.double(), valid, unbiased=False, sum_over=sum_over)[1].sqrt()

    def total(x):
        return distributed.all_reduce_tensor(x.sum().double(), ranks=ranks)

    # exactly 0 with rollout.exact
    mismatch = (rollout.sampler_logprobs - rollout.old_logprobs).abs()
    reward_rows = rollout.rewards.sum(-1)
    trained = mask.any(dim=-1)  # the rows that are samples (an agent trajectory may have left)
    metrics = runlog.host_values({
        "score_mean": mean(rollout.scores, trained), "score_std": std(rollout.scores, trained),
        "reward_mean": mean(reward_rows, trained), "reward_std": std(reward_rows, trained),
        "kl": mean(kl.sum(-1)),
        "entropy": mean(entropy, mask),
        "response_length": mean(mask.sum(-1)),
        **(
            {
                "explained_variance": explained_variance(rollout.old_values.double(),
                                                         rollout.returns.double(), mask,
                                                         sum_over=sum_over)} if with_values
            else {}),
        "mean_logprob": mean(rollout.old_logprobs, mask),
        "logprob_mismatch": mean(mismatch, mask),
        "logprob_mismatch_max": distributed.all_reduce_tensor(
            torch.where(mask, mismatch.double(), float("-inf")).max(), "max", ranks),
        "logprob_mismatch_tokens": total((mismatch != 0) & mask), "tokens": total(mask),
    })
    metrics["perplexity"] = math.exp(-metrics.pop("mean_logprob"))
    tokens = metrics["tokens"] = int(metrics["tokens"])
    metrics["logprob_mismatch_tokens"] = int(metrics["logprob_mismatch_tokens"])
    # Per rank, for the balance of the ranks' work (a gather, only under torchrun).
    metrics["tokens_per_rank"] = [tokens] if distributed.world_size(
        ) == 1 else distributed.all_gather(
        int(mask.sum()))
    # An iteration may generate nothing (partial rollouts: the groups it trains were complete
    # already): no throughput to report then.
    if timer.seconds.get("generate"):
        metrics["tokens_per_s_generate"] = tokens / timer.seconds["generate"]
    return metrics
