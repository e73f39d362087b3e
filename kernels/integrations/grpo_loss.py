"""GRPO-family losses at Liger's call shape (``LigerFusedLinearGRPOLoss``, the interface hosts
already call), on our fused LM head, PPO loss and KL: the [B, T, V] logits never exist.

TRL's loss types, each as TRL 1.x's GRPOTrainer._compute_loss defines it, with ratio
r = exp(logp - old_logp) (its sequence mean at importance_sampling_level="sequence") and the KL
beta * k3(ref, logp) (times r with use_bias_correction_kl) added per token before aggregating:
    grpo      mean over the B rows of each row's token mean (an empty row counts, as 0)
    bnpo      the token mean                                   (agg "token-mean")
    dr_grpo   the token sum / (B x max_completion_length)      ("seq-mean-token-sum-norm")
    dapo      the token sum / num_items_in_batch (the token mean without it, one process)
    cispo     -min(r, epsilon_high) (no gradient) * A * logp, aggregated as dapo
    sapo      -sigmoid(tau (r - 1)) * 4 / tau * A, aggregated as grpo
luspo and vespo are refused (ValueError); TRL's delta (two-sided clipping) is dual_clip = delta,
which it equals for delta > 1 + epsilon_high.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..rl.kl import kl_penalty
from ..rl.linear_logprobs import linear_token_logprobs
from ..rl.ppo_loss import ppo_policy_loss, token_advantages
from ..rl.statistics import aggregate, masked_mean

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
CLIPPED_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IGNORE_INDEX = -100


def loss_aggregation(loss_type: str, mask: torch.Tensor, max_completion_length: Optional[int],
                     num_items_in_batch=None) -> tuple[str, Optional[float], torch.Tensor]:
    """(agg, loss_agg_norm, scale) that give TRL's normalizer of ``loss_type`` for mask [B, T]:
    the loss is scale * aggregate(per_token, mask, agg, norm). scale is 1 but for grpo and sapo,
    whose mean runs over all B rows (empty ones included) where seq-mean-token-mean skips empty
    rows: (non-empty rows) / B."""
    rows = mask.shape[0]
    one = torch.ones((), device=mask.device)
    if loss_type in ("grpo", "sapo"):
        non_empty = (mask != 0).any(dim=-1).sum().float()
        return "seq-mean-token-mean", None, non_empty / max(rows, 1)
    if loss_type == "bnpo":
        return "token-mean", None, one
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("FusedLinearGRPOLoss: loss_type 'dr_grpo' needs max_completion_length")
        return "seq-mean-token-sum-norm", float(rows * max_completion_length), one
    if num_items_in_batch is None:
        return "token-mean", None, one
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return "seq-mean-token-sum-norm", max(float(num_items_in_batch) / world, 1.0), one


def sequence_log_ratio(logp, old_logp, mask):
    """[B, 1] mean log-ratio of each row's valid tokens (TRL's importance_sampling_level
    "sequence"), differentiable w.r.t. logp."""
    valid = (mask != 0).to(logp.dtype)
    return (((logp - old_logp) * valid).sum(-1) / valid.sum(-1).clamp(min=1.0))[:, None]


class FusedLinearGRPOLoss(torch.nn.Module):
    """The GRPO-family loss of hidden states through the LM head, Liger's call shape.

    Constructor: Liger's arguments and defaults (beta 0.04, epsilon_low/high 0.2, loss_type "dapo",
    temperature 1); ``chunk_size`` is Liger's too (sequences per chunk; None: our byte budget,
    linear_logprobs.CHUNK_BYTES); ``compiled`` and ``use_ref_model`` are taken and have no effect
    (our kernels need no compile; no ref_per_token_logps means no KL). Ours only: logit_scale,
    softcap (the head's, see linear_token_logprobs), return_stats (metrics as a dict).
    """

    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True,
                 chunk_size: Optional[int] = None, epsilon_low: float = 0.2,
                 epsilon_high: float = 0.2, loss_type: str = "dapo",
                 max_completion_length: Optional[int] = None,
                 importance_sampling_level: str = "token", sapo_temperature_pos: float = 1.0,
                 sapo_temperature_neg: float = 1.05, temperature: float = 1.0,
                 delta: Optional[float] = None, use_bias_correction_kl: bool = False, *,
                 logit_scale: float = 1.0, softcap: Optional[float] = None,
                 return_stats: bool = False):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"FusedLinearGRPOLoss: loss_type {loss_type!r} has no fused mapping; "
                             f"expected one of {LOSS_TYPES}")
        if importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"FusedLinearGRPOLoss: importance_sampling_level must be 'token' or "
                             f"'sequence', got {importance_sampling_level!r}")
        if delta is not None and not delta > 1 + epsilon_high:
            raise ValueError(f"FusedLinearGRPOLoss: delta must exceed 1 + epsilon_high "
                             f"({1 + epsilon_high}), got {delta!r}")
        if min(sapo_temperature_pos, sapo_temperature_neg) <= 0:
            raise ValueError("FusedLinearGRPOLoss: the sapo temperatures must be positive")
        self.beta, self.loss_type, self.chunk_size = beta, loss_type, chunk_size
        self.epsilon_low, self.epsilon_high, self.delta = epsilon_low, epsilon_high, delta
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperatures = (sapo_temperature_pos, sapo_temperature_neg)
        self.temperature, self.logit_scale, self.softcap = temperature, logit_scale, softcap
        self.use_bias_correction_kl, self.return_stats = use_bias_correction_kl, return_stats

    def forward(self, _input: torch.Tensor, lin_weight: torch.Tensor,
                selected_token_ids: torch.Tensor, attention_mask: torch.Tensor,
                advantages: torch.Tensor, bias: Optional[torch.Tensor] = None,
                ref_per_token_logps: Optional[torch.Tensor] = None,
                old_per_token_logps: Optional[torch.Tensor] = None, ref_input=None,
                ref_weight=None, ref_bias=None, vllm_is_ratio: Optional[torch.Tensor] = None,
                num_items_in_batch=None):
        """(loss [], metrics): _input [B, T, H], lin_weight [V, H], selected_token_ids and
        attention_mask (completion mask) [B, T], advantages [B] / [B, 1] / [B, T], optional
        bias [V], ref_per_token_logps and old_per_token_logps [B, T] (old: none = on-policy),
        vllm_is_ratio [B, T] or [B, 1] (the sampler's IS weight of the policy term).
        metrics: Liger's list [mean KL (when beta != 0), clip ratio], or with return_stats a dict
        (kl, clip_ratio, clipfrac_low, clipfrac_high, entropy). ref_input/ref_weight/ref_bias
        (Liger's reference head) are refused: pass ref_per_token_logps."""
        if ref_input is not None or ref_weight is not None or ref_bias is not None:
            raise ValueError("FusedLinearGRPOLoss: pass ref_per_token_logps, not ref_input/"
                             "ref_weight/ref_bias (the reference model's head)")
        if _input.dim() != 3 or selected_token_ids.shape != _input.shape[:2]:
            raise ValueError(f"FusedLinearGRPOLoss: expected _input [B, T, H] and "
                             f"selected_token_ids [B, T], got {tuple(_input.shape)} and "
                             f"{tuple(selected_token_ids.shape)}")
        mask = attention_mask != 0
        labels = torch.where(mask, selected_token_ids, IGNORE_INDEX)
        chunk = None if self.chunk_size is None else self.chunk_size * _input.shape[1]
        logp, entropy = linear_token_logprobs(
            _input, lin_weight, labels, bias=bias, temperature=self.temperature,
            return_entropy=True, chunk_size=chunk, logit_scale=self.logit_scale,
            softcap=self.softcap)
        loss, stats, kl = self.loss_from_logps(logp, mask, advantages, old_per_token_logps,
                                               ref_per_token_logps, vllm_is_ratio,
                                               num_items_in_batch)
        return loss, self._metrics(stats, kl, entropy, mask)

    def loss_from_logps(self, logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                        old_per_token_logps: Optional[torch.Tensor] = None,
                        ref_per_token_logps: Optional[torch.Tensor] = None,
                        vllm_is_ratio: Optional[torch.Tensor] = None, num_items_in_batch=None):
        """(loss [], stats, per-token KL [B, T] or None) from the policy's log-probs logp [B, T]
        (differentiable) and mask [B, T] (nonzero = valid): the loss of forward after its head,
        for a host that makes the log-probs itself (FusedGRPOTrainer)."""
        mask = mask != 0
        old = logp.detach() if old_per_token_logps is None else old_per_token_logps.detach()
        advantages = token_advantages("FusedLinearGRPOLoss", advantages.detach(), logp)
        agg, norm, scale = loss_aggregation(self.loss_type, mask, self.max_completion_length,
                                            num_items_in_batch)
        policy, stats = self._policy_loss(logp, old, advantages, mask, vllm_is_ratio, agg, norm)
        loss = policy * scale
        kl = None
        if self.beta != 0.0 and ref_per_token_logps is not None:
            ratio = self._ratio(logp, old, mask).expand_as(logp)
            kl = kl_penalty(logp, ref_per_token_logps.detach(), estimator="k3", mask=mask,
                            is_weight=ratio if self.use_bias_correction_kl else None)
            loss = loss + self.beta * aggregate(kl, mask, agg, norm) * scale
        return loss, stats, kl

    def _ratio(self, logp, old, mask):
        """TRL's coef_1: [B, T] (token level) or [B, 1] (sequence level), differentiable."""
        if self.importance_sampling_level == "sequence":
            return sequence_log_ratio(logp, old, mask).exp()
        return (logp - old).exp()

    def _policy_loss(self, logp, old, advantages, mask, vllm_is_ratio, agg, norm):
        """(policy loss by agg, stats). The clipped surrogate is linear in A for a positive
        weight, so the sampler's IS ratio scales the advantages."""
        if vllm_is_ratio is not None:
            advantages = advantages * vllm_is_ratio.detach().to(advantages.dtype)
        if self.loss_type in CLIPPED_TYPES:
            return ppo_policy_loss(logp, old, advantages, mask, clip_eps=self.epsilon_low,
                                   clip_eps_high=self.epsilon_high, dual_clip=self.delta, agg=agg,
                                   loss_agg_norm=norm, ratio_level=self.importance_sampling_level,
                                   clip_sides=True)
        ratio = self._ratio(logp, old, mask)
        if self.loss_type == "cispo":
            weight = ratio.detach().clamp(max=self.epsilon_high)
            per_token = -weight * advantages * logp
            clipped = (ratio.detach() > self.epsilon_high) & (advantages > 0)
        else:  # sapo
            pos, neg = self.sapo_temperatures
            tau = torch.where(advantages > 0, pos, neg)
            per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages
            clipped = torch.zeros_like(mask)
        zero = masked_mean(torch.zeros_like(logp), mask)
        stats = {"clipfrac_low": zero, "clipfrac_high": masked_mean(clipped.float(), mask)}
        return aggregate(per_token.expand_as(logp), mask, agg, norm), stats

    def _metrics(self, stats, kl, entropy, mask):
        clip_ratio = (stats["clipfrac_low"] + stats["clipfrac_high"]).detach()
        kl_mean = None if kl is None else masked_mean(kl.detach(), mask)
        if self.return_stats:
            return {"kl": kl_mean, "clip_ratio": clip_ratio,
                    "clipfrac_low": stats["clipfrac_low"].detach(),
                    "clipfrac_high": stats["clipfrac_high"].detach(),
                    "entropy": masked_mean(entropy.detach(), mask)}
        return ([] if kl_mean is None else [kl_mean]) + [clip_ratio]
