"""One PPO iteration as two functions: `make_rollout` (generate, score, reference and old
log-probs, values, shaped rewards, advantages) and `ppo_update` (K epochs of minibatch updates of
the policy and the critic). They compose the kernels and engine/stages/ppo/core.py; no math lives here.

Under torchrun each rank holds its share of the rollout's rows (the same number on every rank:
rows dropped on one rank are balanced by dropping as many whole groups on the others): statistics
that shape the update (score normalization, advantage whitening, the KL that drives the controller)
and the metrics are taken over all ranks (global_stats.py), each minibatch is every rank's share of
the global one, its loss weights are normalized by the global minibatch's units, and skips and early
stops are decided on global values, so every rank takes the same steps."""
from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ...errors import FusedRLError
from ...train import distributed, optim
from ...inference.hybrid_actor import HybridActor
from ...model.value_model import ValueModel
from ...model.causal_lm import CausalLM
from ...model.lora import LoRA
from ...config.ppo import PPOConfig
from ...config.ppo import GROUP_ESTIMATORS
from . import global_stats
from .core import RunningMoments, advantages_and_returns, finite_rows, group_token_advantages, shape_rewards
from ...data.packing import PackedBatch, pack_sequences
from .rollout import Rollout, pack_rollout, response_logprobs
from ...train.runlog import peak_memory_mb
from .sampling import Samples
from ....kernels import aggregation_rule, kl_penalty, ppo_policy_loss, ppo_value_loss
from ....kernels.policy_corrections import importance_weights
from ....kernels.reference import masked_mean

Scorer = Callable[[list[list[int]], list[list[int]]], torch.Tensor]


@dataclass
class PPOModels:
    """The policy (shared with the actor), the frozen reference, the critic and the scorer. With
    LoRA the policy's weights are frozen, `lora` holds its adapters and there is no reference model:
    the reference is the policy with its adapters off."""
    policy: CausalLM
    reference: Optional[CausalLM]       # None with lora
    actor: HybridActor
    critic: Optional[ValueModel]        # critic="separate"
    value_head: Optional[nn.Linear]     # critic="shared"
    score: Scorer                       # (prompts, responses) token ids -> scores [R]
    lora: Optional[LoRA] = None         # lora.rank > 0

    def reference_logprobs(self, packed: PackedBatch, temperature: float) -> torch.Tensor:
        """logp [R, T] of the frozen reference on a packed rollout (no gradient)."""
        with torch.no_grad(), (self.lora.disabled() if self.lora is not None else contextlib.nullcontext()):
            return response_logprobs(self.reference or self.policy, packed, temperature)[0]

    def forward(self, packed: PackedBatch, temperature: float, with_entropy: bool, exact: bool = False):
        """(logp, entropy or None, values or None when critic-free) [R, T] of the policy and critic
        on a packed rollout; exact: the policy in the actor's batch-invariant mode (rollout.exact)."""
        logp, entropy, values = response_logprobs(self.policy, packed, temperature, with_entropy=with_entropy,
                                                  value_head=self.value_head,
                                                  invariant=self.actor.batch_invariant if exact else None)
        if self.critic is not None:
            values = self.critic.response_values(packed)
        return logp, entropy, values


def reward_model_scorer(rm) -> Scorer:
    """Scores from a reward model (its normalization offset applied) at each sequence's last token."""
    def score(prompts, responses):
        packed = pack_sequences([(p, r, False) for p, r in zip(prompts, responses)],
                                device=next(rm.parameters()).device)
        return rm.rewards(packed.input_ids, packed.seqlens)
    return score


class RewardFunctionError(FusedRLError):
    """The reward function raised, or returned something other than one number per response."""


def function_scorer(fn: Callable, tokenizer, name: str) -> Scorer:
    """Scores from a Python function of the decoded texts: fn(prompts, responses) -> list of floats.
    `name` (e.g. reward_fn's 'module:function') names it in errors."""
    def score(prompts, responses):
        try:
            values = fn([tokenizer.decode(p, skip_special_tokens=True) for p in prompts],
                        [tokenizer.decode(r, skip_special_tokens=True) for r in responses])
        except Exception as e:  # the user's code: its failure is theirs to see, named, in one line
            raise RewardFunctionError(f"the reward function {name} raised {type(e).__name__}: {e}") from e
        try:
            scores = [float(v) for v in values]
        except (TypeError, ValueError) as e:
            raise RewardFunctionError(f"the reward function {name} must return a list of numbers ({e})") from None
        if len(scores) != len(responses):
            raise RewardFunctionError(f"the reward function {name} returned {len(scores)} scores for "
                                      f"{len(responses)} responses")
        return torch.tensor(scores, dtype=torch.float32)
    return score


class PhaseTimer:
    """Wall time and peak GPU memory of each named phase of an iteration."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.peak_mb = device, {}, {}

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        peak = peak_memory_mb(self.device)
        if peak is not None:
            self.peak_mb[name] = max(self.peak_mb.get(name, 0.0), peak)

    def metrics(self) -> dict:
        return {**{f"time_{k}": v for k, v in self.seconds.items()},
                **{f"peak_mem_mb_{k}": v for k, v in self.peak_mb.items()}}


def make_rollout(models: PPOModels, samples: Samples, cfg: PPOConfig, kl_coef: float,
                 moments: RunningMoments, timer: PhaseTimer) -> tuple[Optional[Rollout], dict]:
    """Turn scored samples into a Rollout (reference and old log-probs, values, shaped rewards,
    advantages); returns it and its metrics.

    Rows whose score is not finite are dropped before anything else sees them (with a group
    estimator, their whole group; counted in `dropped_rows`); the Rollout is None when no row is
    left (every score non-finite, or dynamic sampling found no group to learn from), and the
    metrics then say why in `skip_reason`.
    """
    r = cfg.rollout
    device = next(models.policy.parameters()).device
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
    dropped = {"dropped_rows": dropped["dropped_rows"]}
    if len(keep) < len(samples.responses):
        samples = samples.take_rows(keep)
    packed = pack_rollout(samples.prompts, samples.responses, device)
    mask = packed.grid_mask()                                                  # [R, T]
    scores = samples.scores
    with timer.phase("reference"):
        ref_logp = models.reference_logprobs(packed, r.temperature)
    with timer.phase("old"), torch.no_grad():
        old_logp, entropy, old_values = models.forward(packed, r.temperature, with_entropy=True, exact=r.exact)
    kl = kl_penalty(old_logp, ref_logp, estimator=cfg.reward.kl_estimator, mask=mask)
    shaped = (global_stats.own_rows(moments.normalize(global_stats.gather_rows(scores))) if cfg.reward.normalize
              else scores)
    if cfg.reward.clip is not None:
        shaped = shaped.clamp(-cfg.reward.clip, cfg.reward.clip)
    rewards = shape_rewards(kl, shaped, mask, kl_coef)
    if old_values is None:  # critic-free: each row's group-relative advantage on all its tokens
        advantages = group_token_advantages(shaped, mask, samples.n, cfg.ppo.estimator)
        old_values = returns = torch.zeros_like(advantages)
    else:
        advantages, returns = advantages_and_returns(
            rewards, old_values, mask, estimator=cfg.ppo.estimator, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam,
            whiten=False)
        if cfg.ppo.whiten_advantages:  # over all ranks' tokens
            advantages = global_stats.whiten(advantages, mask)
    sampler = packed.to_grid(torch.tensor([x for row in samples.sampler_logprobs for x in row], device=device))
    rollout = Rollout(packed, mask, sampler, old_logp, ref_logp, old_values, scores, rewards,
                      advantages, returns)
    mismatch = (sampler - old_logp).abs()  # exactly 0 with rollout.exact
    rank_tokens = distributed.all_gather(int(mask.sum()))
    g = global_stats
    metrics = {
        "score_mean": g.row_mean(scores), "score_std": g.row_std(scores),
        "reward_mean": g.row_mean(rewards.sum(-1)), "reward_std": g.row_std(rewards.sum(-1)),
        "kl": g.row_mean(kl.sum(-1)), "kl_coef": kl_coef,
        "entropy": g.masked_mean(entropy, mask),
        "response_length": g.row_mean(mask.sum(-1).float()),
        **({} if models.critic is None and models.value_head is None else
           {"explained_variance": g.explained_variance(old_values, returns, mask)}),
        "perplexity": math.exp(-g.masked_mean(old_logp, mask)),
        "logprob_mismatch": g.masked_mean(mismatch, mask), "logprob_mismatch_max": g.masked_max(mismatch, mask),
        **distributed.all_reduce_sum({"logprob_mismatch_tokens": int(((mismatch != 0) & mask).sum())}),
        "tokens_per_s_generate": sum(rank_tokens) / max(timer.seconds["generate"], 1e-9),
        "tokens": sum(rank_tokens), "tokens_per_rank": rank_tokens, **dropped,
    }
    return rollout, metrics


@dataclass
class Optimizers:
    """The policy's optimizer (and the shared value head's params) and the separate critic's."""
    policy: torch.optim.Optimizer
    critic: Optional[torch.optim.Optimizer]
    max_grad_norm: float

    def zero_grad(self):
        for o in self.all():
            o.zero_grad(set_to_none=True)

    def all(self) -> list[torch.optim.Optimizer]:
        return [self.policy] + ([self.critic] if self.critic is not None else [])

    def clip_and_step(self, loss: torch.Tensor) -> torch.Tensor:
        """Clip each model's gradients by its own norm and step all, unless a norm or `loss` is not
        finite (decided on the device, see optim.clip_and_step). Returns the norms before clipping
        ([models] fp32, policy first): a non-finite one means the update was skipped."""
        return torch.stack(optim.clip_and_step(self.all(), self.max_grad_norm, loss))


def aggregation_units(mask: torch.Tensor, agg: str) -> Optional[torch.Tensor]:
    """[B] what each row adds to the denominator of `agg` (valid tokens for token-mean, 1 per
    non-empty row for the seq-mean modes), or None for the sums, which add up as they are."""
    return aggregation_rule(mask, agg)[1]


def _share(units: Optional[torch.Tensor], total: Optional[torch.Tensor], start: int, size: int):
    """A micro-batch's share of the global minibatch's units (1 for the sums, which add up as they are)."""
    return 1.0 if units is None else units[start:start + size].sum() / total


def _global_total(units: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The units of every rank's share of the minibatch (at least 1)."""
    return None if units is None else distributed.all_reduce_tensor(units.sum()).clamp_min(1)


def minibatch_backward(models: PPOModels, batch: Rollout, cfg: PPOConfig,
                       ptx_loss: Optional[Callable]) -> Optional[dict]:
    """Forward and backward of one minibatch, cfg.ppo.microbatch_size rows at a time.

    Each micro-batch's loss is weighted by its share of the minibatch's aggregation units (see
    aggregation_units; for the policy loss, of the tokens the masked IS correction keeps; valid
    tokens for the entropy and KL terms), so the accumulated gradient equals the whole
    minibatch's. The PPO-ptx loss is added once. Returns the minibatch's stats (0-dim tensors),
    "loss" the whole objective (the same on every rank: a non-finite one must skip the update).
    """
    p = cfg.ppo
    rows = batch.mask.shape[0]
    size = min(p.microbatch_size or rows, rows)
    kept = batch.mask
    if p.is_mode == "mis":
        kept = importance_weights(batch.old_logprobs, batch.sampler_logprobs, kept, mode="mis",
                                  level=p.is_level, cap=p.is_cap, low=p.is_low, high=p.is_high)[1]
    policy_units, value_units = aggregation_units(kept, p.agg), aggregation_units(batch.mask, p.agg)
    token_units = batch.mask.sum(-1)
    totals_of = {kind: _global_total(u) for kind, u in
                 (("policy", policy_units), ("value", value_units), ("token", token_units))}
    totals: dict = {}
    total_loss = torch.zeros((), device=batch.mask.device)
    for start in range(0, rows, size):
        micro = batch if size == rows else batch.rows(list(range(start, min(start + size, rows))))
        weights = {kind: _share(u, totals_of[kind], start, size) for kind, u in
                   (("policy", policy_units), ("value", value_units), ("token", token_units))}
        loss, stats = minibatch_loss(models, micro, cfg, weights)
        (loss * distributed.world_size()).backward()  # FSDP averages over ranks; the minibatch sums
        total_loss = total_loss + loss.detach()
        for name, value in stats.items():
            # Losses add up as the loss does; the other stats are per-micro-batch means, weighted
            # by the micro-batch's share of their units (of the tokens, for the sums).
            kind = "value" if name.startswith(("value", "vf_")) else "policy"
            mean_of = kind if (policy_units is not None or name.endswith("_loss")) else "token"
            totals[name] = totals.get(name, 0.0) + weights[mean_of] * value
    if ptx_loss is not None:
        ptx = ptx_loss()
        (p.ptx_coef * ptx).backward()
        total_loss = total_loss + ptx.detach()
        totals["ptx_loss"] = ptx.detach()
    totals["loss"] = total_loss
    if distributed.world_size() == 1:
        return totals
    # Sums of the ranks' weighted shares: the global minibatch's stats (the PPO-ptx batch is the
    # same on every rank, so its loss is averaged instead).
    ptx = totals.pop("ptx_loss", None)
    reduced = distributed.all_reduce_sum({k: float(v) for k, v in totals.items()})
    return reduced if ptx is None else {**reduced, "ptx_loss": float(ptx)}


def minibatch_loss(models: PPOModels, batch: Rollout, cfg: PPOConfig, weights: Optional[dict] = None):
    """The PPO objective on (a micro-batch of) a minibatch: (loss, stats of 0-dim tensors).

    weights (default 1 each): "policy" and "value" scale those losses, "token" the token-mean
    KL and entropy terms (the micro-batch's shares, see minibatch_backward).
    """
    p = cfg.ppo
    w = {"policy": 1.0, "value": 1.0, "token": 1.0, **(weights or {})}
    norm = p.loss_agg_norm or cfg.rollout.max_new_tokens
    logp, entropy, values = models.forward(batch.packed, cfg.rollout.temperature, with_entropy=p.ent_coef > 0)
    policy_loss, stats = ppo_policy_loss(
        logp, batch.old_logprobs, batch.advantages, batch.mask, clip_eps=p.clip_eps, clip_eps_high=p.clip_eps_high,
        dual_clip=p.dual_clip, agg=p.agg, loss_agg_norm=norm, ratio_level=p.ratio_level,
        log_ratio_clamp=p.log_ratio_clamp, rollout_logprobs=batch.sampler_logprobs, is_mode=p.is_mode,
        is_level=p.is_level, is_cap=p.is_cap, is_low=p.is_low, is_high=p.is_high)
    loss = w["policy"] * policy_loss
    stats = {**stats, "policy_loss": policy_loss.detach()}
    if values is not None:
        value_loss, value_stats = ppo_value_loss(values, batch.old_values, batch.returns, batch.mask,
                                                 clip_eps=p.vf_clip, agg=p.agg, loss_agg_norm=norm)
        loss = loss + w["value"] * p.vf_coef * value_loss
        stats.update(value_stats, value_loss=value_loss.detach())
    if p.kl_loss_coef > 0:  # GRPO's KL term: k3 of the current policy against the reference
        kl = masked_mean(kl_penalty(logp, batch.ref_logprobs, estimator="k3", mask=batch.mask), batch.mask)
        loss = loss + p.kl_loss_coef * w["token"] * kl
        stats["kl_loss"] = kl.detach()
    if p.ent_coef > 0:
        loss = loss - p.ent_coef * w["token"] * masked_mean(entropy, batch.mask)
    return loss, stats


def ppo_update(models: PPOModels, optimizers: Optimizers, rollout: Rollout, cfg: PPOConfig, seed: int,
               ptx_loss: Optional[Callable] = None) -> dict:
    """cfg.ppo.epochs passes of shuffled minibatch updates; a non-finite loss or gradient skips
    that update (and is counted), an approx KL past cfg.ppo.max_approx_kl ends the epochs early."""
    rows = rollout.mask.shape[0]
    minibatch = cfg.ppo.minibatch_size  # this rank's rows of one (the global minibatch: x world_size)
    order_rng = torch.Generator().manual_seed(seed)
    totals, updates, skipped, epochs_done = Counter(), 0, 0, 0
    for _ in range(cfg.ppo.epochs):
        order = torch.randperm(rows, generator=order_rng).tolist()
        stop = False
        for start in range(0, rows, minibatch):
            optimizers.zero_grad()
            stats = minibatch_backward(models, rollout.rows(order[start:start + minibatch]), cfg, ptx_loss)
            norms = optimizers.clip_and_step(torch.as_tensor(stats["loss"]))
            if not bool(torch.isfinite(norms).all()):  # the step was skipped on the device
                skipped += 1
                continue
            updates += 1
            totals.update({k: float(v) for k, v in stats.items()})
            totals["grad_norm"] += float(norms[0])
            if cfg.ppo.max_approx_kl > 0 and float(stats["approx_kl"]) > cfg.ppo.max_approx_kl:
                stop = True
                break
        epochs_done += 1
        if stop:
            break
    optimizers.zero_grad()
    return {**{k: v / max(updates, 1) for k, v in totals.items()},
            "updates": updates, "skipped_updates": skipped, "epochs_done": epochs_done}
