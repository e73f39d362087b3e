"""The update half of a PPO iteration: `ppo_update` (K epochs of minibatch updates of the policy
and the critic) over a PPOBatch (batch.py, built by experience.py). It composes the kernels and
engine/stages/ppo/advantages.py; no math lives here.

Minibatches and micro-batches are cut from the rollout's one pack by index. An epoch takes
ceil(rows / ppo.minibatch_size) minibatches of sizes as equal as the rows allow (16 rows at size
5: four of 4, not 5, 5, 5 and 1), said once when the run starts (`minibatch_rule`). A
minibatch's stats stay on the device until its one host read (the skip and early-stop decisions
need them).

Under torchrun each minibatch is every rank's share of the global one, its loss weights are
normalized by the global minibatch's units, and skips and early stops are decided on global
values, so every rank takes the same steps."""
from __future__ import annotations

import dataclasses

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import contextlib

import torch

from ...config.moe import RouterLossConfig
from ...config.ppo import PPOConfig, UpdateConfig
from ...model.moe import moe_blocks, routing_trace
from ...train.router_losses import trace_losses
from ...data.device_tensors import device_tensor
from ...data.prefix_sharing import grouped_order
from ...parallel import distributed
from ...train import runlog
from ....kernels import (aggregation_rule, importance_weights, kl_penalty, masked_mean,
                         ppo_policy_loss, ppo_value_loss)
from .forwards import policy_forward
from ..rollout.microbatches import microbatch_rows, minibatch_bounds
from ..rollout.models import PPOModels
from ..rollout.optimizers import Optimizers
from .batch import PPOBatch


@dataclass(frozen=True)
class UpdateSettings:
    """What the update reads of a PPOConfig: its ppo section, the temperature the log-probs are
    taken at (rollout.temperature) and the constant of seq-mean-token-sum-norm (ppo.loss_agg_norm,
    default rollout.max_new_tokens); `router`: the moe section's router losses."""
    ppo: UpdateConfig
    temperature: float
    loss_agg_norm: float
    router: RouterLossConfig = field(default_factory=RouterLossConfig)

    @classmethod
    def of(cls, cfg: PPOConfig) -> "UpdateSettings":
        """ppo.is_mode resolved: null is tis with rollout.partial_rollouts (a carried answer's
        tokens were drawn by older weights), else off; off is None, as the loss kernels read it;
        ppo.tokens_per_microbatch resolved (auto: PPOConfig.microbatch_tokens)."""
        mode = cfg.ppo.is_mode or ("tis" if cfg.rollout.partial_rollouts else "off")
        ppo = dataclasses.replace(cfg.ppo, is_mode=None if mode == "off" else mode,
                                  tokens_per_microbatch=cfg.microbatch_tokens)
        norm = cfg.ppo.loss_agg_norm or cfg.rollout.max_new_tokens
        return cls(ppo, cfg.rollout.temperature, norm, cfg.moe)


@dataclass
class UpdateResult:
    """What ppo_update did: minibatch updates taken and skipped (a non-finite loss or gradient),
    epochs run (fewer when the approx KL stopped them early), and each minibatch stat's mean over
    the updates taken."""
    updates: int
    skipped_updates: int
    epochs_done: int
    means: dict

    def metrics(self) -> dict:
        return {**self.means, "updates": self.updates, "skipped_updates": self.skipped_updates,
                "epochs_done": self.epochs_done}


def aggregation_units(mask: torch.Tensor, agg: str) -> Optional[torch.Tensor]:
    """[B] what each row adds to the denominator of `agg` (valid tokens for token-mean, 1 per
    non-empty row for the seq-mean modes), or None for the sums, which add up as they are."""
    return aggregation_rule(mask, agg)[1]


def _global_total(units: Optional[torch.Tensor],
                  ranks: distributed.DataRanks) -> Optional[torch.Tensor]:
    """The units of every rank's share of the minibatch (at least 1)."""
    if units is None:
        return None
    return distributed.all_reduce_tensor(units.sum(), ranks=ranks).clamp_min(1)


def minibatch_backward(models: PPOModels, batch: PPOBatch, settings: UpdateSettings,
                       ptx_loss: Optional[Callable]) -> dict:
    """Forward and backward of one minibatch, in micro-batches of ppo.microbatch_size rows or
    of ppo.tokens_per_microbatch tokens (see microbatch_rows); under torchrun every rank runs as
    many as the rank with most (distributed.match_forwards).

    Each micro-batch's loss is weighted by its share of the minibatch's aggregation units (see
    aggregation_units; for the policy loss, of the tokens the masked IS correction keeps; valid
    tokens for the entropy and KL terms), so the accumulated gradient equals the whole
    minibatch's, however it is cut. The PPO-ptx loss is added once. Returns the minibatch's stats
    (0-dim tensors on the device, summed over the ranks), "loss" the whole objective (the same on
    every rank: a non-finite one must skip the update).
    """
    p = settings.ppo
    kept = batch.mask
    if p.is_mode == "mis":
        kept = importance_weights(batch.old_logprobs, batch.sampler_logprobs, kept, mode="mis",
                                  level=p.is_level, cap=p.is_cap, low=p.is_low, high=p.is_high)[1]
    units = {"policy": aggregation_units(kept, p.agg),
             "value": aggregation_units(batch.mask, p.agg),
             "token": batch.mask.sum(-1)}
    totals_of = {kind: _global_total(u, models.ranks) for kind, u in units.items()}
    packed = batch.packed
    micros = microbatch_rows(packed.seqlens, p.microbatch_size, p.tokens_per_microbatch,
                             (packed.prefix_groups, packed.prompt_lens))
    # Agreed before the forwards (their collectives).
    most = distributed.max_over_ranks(len(micros), models.ranks)
    backward = micro_backward(models, most, with_ptx=ptx_loss is not None)
    totals: dict = {}
    total_loss = torch.zeros((), device=batch.mask.device)
    for rows in micros:
        micro, pick = batch, None
        if len(micros) > 1:
            micro, pick = batch.rows(rows), device_tensor(rows, torch.int64, batch.mask.device)
        # A micro-batch's share of the global minibatch's units (1 for the sums, which add up as
        # they are).
        weights = {kind: 1.0 if u is None
                   else (u if pick is None else u.index_select(0, pick)).sum() / totals_of[kind]
                   for kind, u in units.items()}
        loss, stats = minibatch_loss(models, micro, settings, weights)
        # FSDP (or average_over_data, tensor-parallel) averages over the data ranks; the minibatch
        # sums.
        backward(loss)
        total_loss = total_loss + loss.detach()
        for name, value in stats.items():
            # Losses add up as the loss does; the other stats are per-micro-batch means, weighted
            # by the micro-batch's share of their units (of the tokens, for the sums).
            kind = "value" if name.startswith(("value", "vf_")) else "policy"
            mean_of = kind if (units["policy"] is not None or name.endswith("_loss")) else "token"
            totals[name] = totals.get(name, 0.0) + weights[mean_of] * value
    # Ranks cutting their rows by tokens may run different numbers of forwards, each a collective
    # under FSDP: the ranks with fewer repeat their smallest micro-batch with its loss times 0.
    seqlens = batch.packed.seqlens

    def spare():
        rows = min(micros, key=lambda rows: sum(seqlens[r] for r in rows))
        micro = batch.rows(rows) if len(micros) > 1 else batch
        backward(minibatch_loss(models, micro, settings)[0] * 0.0)
    spares = distributed.match_forwards(len(micros), most, spare)
    ptx = None
    if ptx_loss is not None:
        ptx = ptx_loss()
        distributed.all_reduce_in_backward(models.policy, True)
        (p.ptx_coef * ptx).backward()
        total_loss = total_loss + ptx.detach()
    totals["loss"] = total_loss
    totals = summed_over_ranks(totals, spares, models.ranks)
    if ptx is not None:  # the PPO-ptx batch is the same on every rank: its loss is not summed
        totals["ptx_loss"] = ptx.detach()
    return totals


def micro_backward(models: PPOModels, backwards: int, with_ptx: bool) -> Callable:
    """backward(loss) of each of a minibatch's `backwards` micro-batch losses, in order. HSDP: a
    model's gradients cross the shard groups (the nodes) in its last backward of the minibatch
    only: the critic's (or value head's) last micro-batch, the policy's PPO-ptx if any."""
    left = iter(range(backwards - 1, -1, -1))  # micro-batch backwards left after each

    def backward(loss: torch.Tensor) -> None:
        last = next(left) == 0
        for model in (models.critic, models.value_head):
            if model is not None:
                distributed.all_reduce_in_backward(model, last)
        distributed.all_reduce_in_backward(models.policy, last and not with_ptx)
        # Context-parallel: FSDP averages over every rank, and a context group's C ranks hold parts
        # of one gradient (parallel/context_parallel.py): times C, their sum.
        cp = models.policy.context_parallel
        (loss * models.ranks.size() * (cp.size if cp is not None else 1)).backward()
    return backward


def summed_over_ranks(totals: dict, spares: int, ranks: distributed.DataRanks) -> dict:
    """A minibatch's stats (0-dim tensors: every rank's weighted shares) summed over the data
    ranks in one all-reduce: the global minibatch's, with spare_forwards (the forwards run only to
    keep the ranks in step); themselves on one rank."""
    if ranks.size() == 1:
        return totals
    loss = totals["loss"]
    totals = {**totals, "spare_forwards": torch.full((), float(spares), device=loss.device)}
    names = list(totals)
    summed = distributed.all_reduce_tensor(torch.stack([totals[k] for k in names]), ranks=ranks)
    return dict(zip(names, summed))


def minibatch_loss(models: PPOModels, batch: PPOBatch, settings: UpdateSettings,
                   weights: Optional[dict] = None):
    """The PPO objective on (a micro-batch of) a minibatch: (loss, stats of 0-dim tensors).

    weights (default 1 each): "policy" and "value" scale those losses, "token" the token-mean
    KL and entropy terms (the micro-batch's shares, see minibatch_backward).
    """
    p, norm = settings.ppo, settings.loss_agg_norm
    w = {"policy": 1.0, "value": 1.0, "token": 1.0, **(weights or {})}
    router = settings.router.enabled and bool(moe_blocks(models.policy))
    with routing_trace(models.policy) if router else contextlib.nullcontext() as trace:
        logp, entropy, values = policy_forward(models, batch.packed, settings.temperature,
                                               with_entropy=p.ent_coef > 0)
    policy_loss, stats = ppo_policy_loss(
        logp, batch.old_logprobs, batch.advantages, batch.mask, clip_eps=p.clip_eps,
        clip_eps_high=p.clip_eps_high, dual_clip=p.dual_clip, agg=p.agg, loss_agg_norm=norm,
        ratio_level=p.ratio_level, log_ratio_clamp=p.log_ratio_clamp,
        rollout_logprobs=batch.sampler_logprobs, is_mode=p.is_mode, is_level=p.is_level,
        is_cap=p.is_cap, is_low=p.is_low, is_high=p.is_high)
    loss = w["policy"] * policy_loss
    stats = {**stats, "policy_loss": policy_loss.detach()}
    if values is not None:
        value_loss, value_stats = ppo_value_loss(values, batch.old_values, batch.returns,
                                                 batch.mask, clip_eps=p.vf_clip, agg=p.agg,
                                                 loss_agg_norm=norm)
        loss = loss + w["value"] * p.vf_coef * value_loss
        stats.update(value_stats, value_loss=value_loss.detach())
    if p.kl_loss_coef > 0:  # GRPO's KL term: k3 of the current policy against the reference
        kl = masked_mean(kl_penalty(logp, batch.ref_logprobs, estimator="k3", mask=batch.mask),
                         batch.mask)
        loss = loss + p.kl_loss_coef * w["token"] * kl
        stats["kl_loss"] = kl.detach()
    if p.ent_coef > 0:
        loss = loss - p.ent_coef * w["token"] * masked_mean(entropy, batch.mask)
    if router:  # the moe section's router losses, the micro-batch's share of the tokens
        router_loss, router_stats = trace_losses(models.policy, trace, settings.router)
        loss = loss + w["token"] * router_loss
        stats.update(router_stats)
    return loss, stats


def minibatch_rule(rows: int, size: int) -> str | None:
    """What an epoch does with `rows` rows per rank at ppo.minibatch_size=`size`, when the size does
    not divide them (None when it does, or holds them all: one minibatch of the whole rollout)."""
    if rows % size == 0 or size >= rows:
        return None
    sizes = sorted({end - start for start, end in minibatch_bounds(rows, size)}, reverse=True)
    count = len(minibatch_bounds(rows, size))
    return (f"ppo.minibatch_size={size} does not divide the rollout's {rows} rows per rank "
            "(rollout.prompts_per_iteration x rollout.samples_per_prompt): each epoch takes "
            f"{count} minibatches of {' or '.join(map(str, sizes))} rows")


def ppo_update(models: PPOModels, optimizers: Optimizers, rollout: PPOBatch,
               settings: UpdateSettings, seed: int,
               ptx_loss: Optional[Callable] = None) -> UpdateResult:
    """ppo.epochs passes of shuffled minibatch updates; a non-finite loss or gradient skips that
    update (and is counted), an approx KL past ppo.max_approx_kl ends the epochs early. ptx_loss():
    the PPO-ptx term, added to each minibatch's loss. One host sync per minibatch (its stats, norms
    and skip flag read together)."""
    p = settings.ppo
    rows = rollout.mask.shape[0]
    minibatch = p.minibatch_size  # this rank's rows of one (the global minibatch: x world_size)
    order_rng = torch.Generator().manual_seed(seed)
    totals, updates, skipped, epochs_done = Counter(), 0, 0, 0
    for _ in range(p.epochs):
        order = torch.randperm(rows, generator=order_rng).tolist()  # a host tensor: no device sync
        stop = False
        for start, end in minibatch_bounds(rows, minibatch):
            optimizers.zero_grad()
            # A group's rows together: its micro-batches read its prompt once (prefix sharing).
            rows_of = grouped_order(order[start:end], rollout.packed.prefix_groups)
            stats = minibatch_backward(models, rollout.rows(rows_of), settings, ptx_loss)
            norms = optimizers.clip_and_step(stats["loss"])
            host = runlog.host_values(
                {**stats, "grad_norm": norms[0], "stepped": torch.isfinite(norms).all()})
            if not host.pop("stepped"):  # the step was skipped on the device
                skipped += 1
                continue
            updates += 1
            totals.update(host)
            if p.max_approx_kl > 0 and host["approx_kl"] > p.max_approx_kl:
                stop = True
                break
        epochs_done += 1
        if stop:
            break
    optimizers.zero_grad()
    return UpdateResult(updates, skipped, epochs_done,
                        {k: v / max(updates, 1) for k, v in totals.items()})
