"""The update of an on-policy distillation iteration: ppo.epochs passes of minibatch steps of the
student over a DistillBatch, each micro-batch's loss the divergence to the teacher at every
sampled position (both heads fused: fusedrl.kernels.linear_distill_divergence, on the two models'
hidden states; no [tokens, vocabulary] logits), plus distill.reward_coef x the policy gradient of
the reward's group advantage. distill.mode=sampled takes the reverse KL on the sampled token
instead, log p_teacher - log p_student as a per-token advantage of the same policy gradient.

Minibatches and micro-batches are cut as PPO's are (ppo/update.py's minibatch_bounds and
microbatch_rows); every loss is a sum over tokens divided by the minibatch's tokens over all
ranks, so the accumulated gradient is the minibatch's token mean however it is cut."""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch

from ....kernels import linear_distill_divergence, ppo_policy_loss
from ...config.distill import DistillConfig, DistillSection
from ...config.ppo import UpdateConfig
from ...data.packing import PackedBatch
from ...data.prefix_sharing import grouped_order
from ...model.lm_head import head_dtype, lm_head_logprobs, sampler_bias
from ...parallel import distributed
from ...train import runlog
from ..rollout.models import PPOModels
from ..rollout.optimizers import Optimizers
from ..rollout.microbatches import microbatch_rows, minibatch_bounds
from .teacher import Teacher, TeacherScores, target_index


@dataclass(frozen=True)
class DistillSettings:
    """What the update reads of a DistillConfig: the distill section, the ppo section (epochs,
    minibatch_size, micro-batches by rows or tokens resolved, clip_eps) and the temperature the
    sampler's log-probs were taken at (rollout.temperature: the policy gradient's ratio)."""
    distill: DistillSection
    ppo: UpdateConfig
    sampling_temperature: float

    @classmethod
    def of(cls, cfg: DistillConfig) -> "DistillSettings":
        return cls(cfg.distill,
                   dataclasses.replace(cfg.ppo, tokens_per_microbatch=cfg.microbatch_tokens),
                   cfg.rollout.temperature)


@dataclass
class DistillBatch:
    """What one iteration learns from, per target of the pack (row after row, M in all):
    the teacher's scores, the sampler's log-probs [M] and the reward's group advantages [M] (None
    without distill.reward_coef, or on a batch of dataset completions)."""
    packed: PackedBatch
    teacher: TeacherScores
    sampler_logprobs: torch.Tensor
    advantages: Optional[torch.Tensor] = None

    def rows(self, rows: list[int]) -> "DistillBatch":
        """The sub-batch of sequences `rows` (in that order)."""
        index = target_index(self.packed, rows)
        return DistillBatch(self.packed.select(rows), self.teacher.take(index),
                            self.sampler_logprobs.index_select(0, index),
                            None if self.advantages is None
                            else self.advantages.index_select(0, index))


def micro_loss(models: PPOModels, teacher: Teacher, batch: DistillBatch, s: DistillSettings,
               total_tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The student's loss on one micro-batch, its share of the minibatch's (the token sums over
    `total_tokens`, the minibatch's targets on every rank): (loss, sums of the per-token stats)."""
    policy, d = models.policy, s.distill
    hidden, target_rows, _ = policy.forward_rows(batch.packed)                 # [N', Hs]
    h = hidden.index_select(0, target_rows)                                    # [M, Hs]
    # whole: a tensor-parallel head's vocabulary slices gathered (differentiably), as the
    # divergence reads every token of both heads; a plain tensor as it is
    weight = distributed.whole_value(policy.lm_head.weight)                    # [V, Hs]
    # a vision student's sampler mask (-inf at its vision ids; None for text), and the teacher's
    bias = sampler_bias(policy, h.device)
    stats = {"teacher_logprob": batch.teacher.logprobs.sum()}
    loss = h.new_zeros((), dtype=torch.float32)
    advantages = None
    if d.mode != "sampled":
        dtype = head_dtype(h, weight)
        mask = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        t = batch.teacher
        teacher_head = {"teacher_hidden": None, "teacher_weight": None,
                        "teacher_topk_ids": t.topk_ids, "teacher_topk_logprobs": t.topk_logprobs
                        } if d.mode == "top_k" else {"teacher_hidden": t.hidden.to(dtype),
                                                     "teacher_weight": teacher.head.to(dtype),
                                                     "teacher_bias": _cast(teacher.bias, dtype)}
        with torch.autocast(h.device.type, enabled=False):  # as lm_head.py: one dtype both ways
            divergence, entropy = linear_distill_divergence(
                h.to(dtype), weight.to(dtype), mask=mask, beta=d.beta,
                temperature=d.temperature, reduction="sum", mode=d.mode,
                student_bias=_cast(bias, dtype), **teacher_head)
        loss = loss + divergence / total_tokens
        stats.update(divergence=divergence.detach(), entropy=entropy.sum())  # per token: summed
    if d.mode == "sampled" or batch.advantages is not None:
        # at the sampler's temperature: the ratio to its log-probs (DistillConfig makes the
        # sampled mode's divergence temperature the same)
        logp, entropy = lm_head_logprobs(h, weight, batch.packed.target_ids,
                                         temperature=s.sampling_temperature, with_entropy=True,
                                         bias=bias)
        advantages = torch.zeros_like(logp)
        if d.mode == "sampled":  # the reverse KL on the sampled token, as an advantage
            reverse_kl = batch.sampler_logprobs - batch.teacher.logprobs
            advantages = advantages - reverse_kl
            stats.update(divergence=reverse_kl.sum(), entropy=entropy.detach().sum())
        if batch.advantages is not None:
            advantages = advantages + d.reward_coef * batch.advantages
        # token-mean over this micro-batch, times its share of the minibatch's tokens
        pg_loss, _ = ppo_policy_loss(logp, batch.sampler_logprobs, advantages, None,
                                     clip_eps=s.ppo.clip_eps)
        loss = loss + pg_loss * (logp.shape[0] / total_tokens)
    return loss, stats


def _cast(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if bias is None else bias.to(dtype)


def minibatch_backward(models: PPOModels, teacher: Teacher, batch: DistillBatch,
                       s: DistillSettings) -> dict:
    """Forward and backward of one minibatch in micro-batches (ppo.microbatch_size rows or
    ppo.tokens_per_microbatch tokens); under torchrun every rank runs as many backwards as the rank
    with most. Returns the minibatch's loss and per-token stats' token means over the ranks
    (0-dim tensors on the device)."""
    p, packed = s.ppo, batch.packed
    device = batch.sampler_logprobs.device
    tokens = torch.full((), float(packed.num_targets), device=device)  # a fill: no host copy
    total = distributed.all_reduce_tensor(tokens, ranks=models.ranks).clamp_min(1)
    micros = microbatch_rows(packed.seqlens, p.microbatch_size, p.tokens_per_microbatch,
                             (packed.prefix_groups, packed.prompt_lens))
    most = distributed.max_over_ranks(len(micros), models.ranks)
    left = iter(range(most - 1, -1, -1))

    def backward(loss):
        distributed.all_reduce_in_backward(models.policy, next(left) == 0)
        (loss * models.ranks.size()).backward()  # FSDP averages over the ranks; the loss sums
    sums: dict = {"loss": torch.zeros((), device=device)}
    for rows in micros:
        micro = batch.rows(rows) if len(micros) > 1 else batch
        loss, stats = micro_loss(models, teacher, micro, s, total)
        backward(loss)
        sums["loss"] = sums["loss"] + loss.detach()
        for name, value in stats.items():
            sums[name] = sums.get(name, 0.0) + value / total

    def spare():
        rows = min(micros, key=lambda rows: sum(packed.seqlens[r] for r in rows))
        backward(micro_loss(models, teacher, batch.rows(rows), s, total)[0] * 0.0)
    distributed.match_forwards(len(micros), most, spare)
    if models.ranks.size() > 1:
        names = list(sums)
        summed = distributed.all_reduce_tensor(torch.stack([sums[k] for k in names]),
                                               ranks=models.ranks)
        sums = dict(zip(names, summed))
    return sums


def distill_update(models: PPOModels, teacher: Teacher, optimizers: Optimizers,
                   batch: DistillBatch, s: DistillSettings, seed: int) -> dict:
    """ppo.epochs passes of shuffled minibatch steps over `batch`; a non-finite loss or gradient
    skips that step (counted). Returns each stat's mean over the steps taken, with "updates" and
    "skipped_updates". One host read per minibatch."""
    rows = len(batch.packed.seqlens)
    order_rng = torch.Generator().manual_seed(seed)
    totals, updates, skipped = Counter(), 0, 0
    for _ in range(s.ppo.epochs):
        order = torch.randperm(rows, generator=order_rng).tolist()
        for start, end in minibatch_bounds(rows, s.ppo.minibatch_size):
            optimizers.zero_grad()
            # a group's rows together: its micro-batches read its prompt once (prefix sharing)
            rows_of = grouped_order(order[start:end], batch.packed.prefix_groups)
            stats = minibatch_backward(models, teacher, batch.rows(rows_of), s)
            norms = optimizers.clip_and_step(stats["loss"])
            host = runlog.host_values(
                {**stats, "grad_norm": norms[0], "stepped": torch.isfinite(norms).all()})
            if not host.pop("stepped"):
                skipped += 1
                continue
            updates += 1
            totals.update(host)
    optimizers.zero_grad()
    return {**{k: v / max(updates, 1) for k, v in totals.items()}, "updates": updates,
            "skipped_updates": skipped}
