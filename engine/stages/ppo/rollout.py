"""A PPO batch of experience: R sequences (prompt + sampled response), per-token data as [R, T],
and `make_rollout`, which builds it from scored samples (reference and old log-probs, values,
shaped rewards, advantages) and measures it.

T is the longest response; `mask` [R, T] is True on each row's response tokens. A row's sequence is
packed for the training forward as prompt + response (a PackedBatch whose targets are the response
tokens), and the hidden state at the position before each response token is the one that predicts it
(and whose value the critic reads). The rows are packed once, right after generation: scoring, the
reference, old log-probs, values and the update's minibatches read that pack (cut by index).

Under torchrun each rank holds its share of the rollout's rows (the same number on every rank: rows
dropped on one rank are balanced by dropping as many whole groups on the others); statistics that
shape the update (score normalization, advantage whitening, the KL that drives the controller) and
the metrics are taken over all ranks (global_stats.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from ...config.ppo import GROUP_ESTIMATORS, PPOConfig
from ...data.packing import PackedBatch, pack_sequences
from ... import distributed
from ....kernels import kl_penalty
from . import global_stats
from .core import RunningMoments, advantages_and_returns, finite_rows, group_token_advantages, shape_rewards
from .phase_timer import PhaseTimer
from .scoring import policy_forward, reference_logprobs

if TYPE_CHECKING:
    from .models import PPOModels
    from .sampling import Samples


def pack_rollout(prompts: list[list[int]], responses: list[list[int]], device,
                 width: int | None = None) -> PackedBatch:
    """Pack prompt + response pairs, the response tokens as targets on an [R, width] grid
    (default width: the longest response)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"pack_rollout: need as many responses as prompts (> 0), got "
                         f"{len(prompts)} prompts and {len(responses)} responses")
    width = width or max(len(r) for r in responses)
    for r, (prompt, response) in enumerate(zip(prompts, responses)):
        if not prompt or not response or len(response) > width:
            raise ValueError(f"pack_rollout: row {r} has {len(prompt)} prompt and {len(response)} "
                             f"response tokens; both must be >= 1 and the response <= width {width}")
    return pack_sequences([(p, r, True) for p, r in zip(prompts, responses)], width=width, device=device)


def concat_packs(parts: list[PackedBatch]) -> PackedBatch:
    """Rollout packs one after the other (e.g. dynamic sampling's rounds), on the widest grid.
    Offsets are added on the device; the lengths are host lists (no sync)."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.width for p in parts)
    token_offset = row_offset = 0
    rows, grids = [], []
    for p in parts:
        rows.append(p.target_rows + token_offset)
        # A target at (row, column) of its part's grid moves to (row + row_offset, column) of the wider one.
        grids.append(torch.div(p.grid_index, p.width, rounding_mode="floor") * width
                     + p.grid_index % p.width + row_offset * width)
        token_offset, row_offset = token_offset + sum(p.seqlens), row_offset + len(p.seqlens)
    seqlens = [n for p in parts for n in p.seqlens]
    cu = torch.tensor([0] + seqlens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return PackedBatch(torch.cat([p.input_ids for p in parts]), seqlens, torch.cat(rows),
                       torch.cat([p.target_ids for p in parts]), [n for p in parts for n in p.target_counts], [],
                       torch.cat(grids), width, torch.cat([p.positions for p in parts]),
                       cu.to(parts[0].input_ids.device))


def pad_width(grid: torch.Tensor, width: int) -> torch.Tensor:
    """[R, T] -> [R, width] (width >= T), zeros on the right."""
    return torch.nn.functional.pad(grid, (0, width - grid.shape[1]))


@dataclass
class Rollout:
    """Everything one PPO iteration learns from. Per-token fields are [R, T] fp32 (mask bool)."""
    packed: PackedBatch           # the R prompt + response sequences, packed once per rollout
    mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    scores: torch.Tensor          # [R] reward-model (or function) scores, before normalization
    rewards: torch.Tensor         # per-token shaped rewards
    advantages: torch.Tensor
    returns: torch.Tensor

    def rows(self, index: list[int]) -> "Rollout":
        """The sub-batch of the given rows (same width T), every field cut by one index tensor."""
        pick = torch.tensor(index, device=self.mask.device)
        fields = {name: value.index_select(0, pick) for name, value in vars(self).items()
                  if isinstance(value, torch.Tensor)}
        return Rollout(packed=self.packed.select(index), **fields)


def make_rollout(models: "PPOModels", samples: "Samples", cfg: PPOConfig, kl_coef: float,
                 moments: RunningMoments, timer: PhaseTimer) -> tuple[Optional[Rollout], dict]:
    """Turn scored samples into a Rollout (reference and old log-probs, values, shaped rewards,
    advantages); returns it and its metrics (read with one host sync, besides the finite-score
    check's and, with reward.normalize, the running moments').

    Rows whose score is not finite are dropped before anything else sees them (with a group
    estimator, their whole group; counted in `dropped_rows`); the Rollout is None when no row is
    left (every score non-finite, or dynamic sampling found no group to learn from), and the
    metrics then say why in `skip_reason`.
    """
    r = cfg.rollout
    group = samples.n if cfg.ppo.estimator in GROUP_ESTIMATORS else None
    keep = finite_rows(samples.scores, group)
    unit = group or 1  # whole groups: every rank keeps as many rows as the rank that keeps fewest
    keep = keep[:distributed.min_over_ranks(len(keep) // unit) * unit]
    dropped = distributed.all_reduce_sum({"dropped_rows": len(samples.responses) - len(keep),
                                          "drawn_rows": len(samples.responses)})
    if not keep:
        reason = ("no prompt group had scores that differ (dynamic sampling)" if not dropped["drawn_rows"]
                  else f"all {dropped['drawn_rows']} scores were NaN or inf" if distributed.world_size() == 1
                  else "some rank had no finite score left (ranks keep equal numbers of rows)")
        return None, {"dropped_rows": dropped["dropped_rows"], "skip_reason": reason}
    if len(keep) < len(samples.responses):
        samples = samples.take_rows(keep)
    packed = samples.packed
    mask = packed.grid_mask()                                                  # [R, T]
    scores = samples.scores
    with timer.phase("reference"):
        ref_logp = reference_logprobs(models, packed, r.temperature)
    with timer.phase("old"), torch.no_grad():
        old_logp, entropy, old_values = policy_forward(models, packed, r.temperature, with_entropy=True,
                                                       exact=r.exact)
    kl = kl_penalty(old_logp, ref_logp, estimator=cfg.reward.kl_estimator, mask=mask)
    shaped = (global_stats.own_rows(moments.normalize(global_stats.gather_rows(scores))) if cfg.reward.normalize
              else scores)
    if cfg.reward.clip is not None:
        shaped = shaped.clamp(-cfg.reward.clip, cfg.reward.clip)
    rewards = shape_rewards(kl, shaped, mask, kl_coef)
    with_values = old_values is not None
    if not with_values:  # critic-free: each row's group-relative advantage on all its tokens
        advantages = group_token_advantages(shaped, mask, samples.n, cfg.ppo.estimator)
        old_values = returns = torch.zeros_like(advantages)
    else:
        advantages, returns = advantages_and_returns(
            rewards, old_values, mask, estimator=cfg.ppo.estimator, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam,
            whiten=False)
        if cfg.ppo.whiten_advantages:  # over all ranks' tokens
            advantages = global_stats.whiten(advantages, mask)
    rollout = Rollout(packed, mask, samples.sampler_logprobs, old_logp, ref_logp, old_values, scores, rewards,
                      advantages, returns)
    metrics = rollout_metrics(rollout, kl, entropy, with_values, timer)
    return rollout, {**metrics, "kl_coef": kl_coef, "dropped_rows": dropped["dropped_rows"]}


def rollout_metrics(rollout: Rollout, kl: torch.Tensor, entropy: torch.Tensor, with_values: bool,
                    timer: PhaseTimer) -> dict:
    """The rollout's metrics over all ranks: computed on the device, read with one host sync."""
    g, mask = global_stats, rollout.mask
    mismatch = (rollout.sampler_logprobs - rollout.old_logprobs).abs()  # exactly 0 with rollout.exact
    reward_rows = rollout.rewards.sum(-1)
    metrics = g.read({
        "score_mean": g.row_mean(rollout.scores), "score_std": g.row_std(rollout.scores),
        "reward_mean": g.row_mean(reward_rows), "reward_std": g.row_std(reward_rows),
        "kl": g.row_mean(kl.sum(-1)),
        "entropy": g.masked_mean(entropy, mask),
        "response_length": g.row_mean(mask.sum(-1).float()),
        **({"explained_variance": g.explained_variance(rollout.old_values, rollout.returns, mask)}
           if with_values else {}),
        "mean_logprob": g.masked_mean(rollout.old_logprobs, mask),
        "logprob_mismatch": g.masked_mean(mismatch, mask), "logprob_mismatch_max": g.masked_max(mismatch, mask),
        "logprob_mismatch_tokens": g.total((mismatch != 0) & mask), "tokens": g.total(mask),
    })
    metrics["perplexity"] = math.exp(-metrics.pop("mean_logprob"))
    tokens = metrics["tokens"] = int(metrics["tokens"])
    metrics["logprob_mismatch_tokens"] = int(metrics["logprob_mismatch_tokens"])
    # Per rank, for the balance of the ranks' work (a gather, only under torchrun).
    metrics["tokens_per_rank"] = [tokens] if distributed.world_size() == 1 else distributed.all_gather(
        int(mask.sum()))
    metrics["tokens_per_s_generate"] = tokens / max(timer.seconds["generate"], 1e-9)
    return metrics
