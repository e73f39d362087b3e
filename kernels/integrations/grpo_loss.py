"""GRPO-family losses at Liger's call shape (``LigerFusedLinearGRPOLoss``, the interface hosts
already call), on our fused LM head, PPO loss and KL: the [B, T, V] logits never exist.

TRL's loss types, each as TRL 1.x's GRPOTrainer._compute_loss defines it, with ratio
r = exp(logp - old_logp) and the KL beta * k3(ref, logp) (times r with use_bias_correction_kl)
added per token; the mask m weights each token by its value (a float mask is a weight, as TRL and
Liger read it), and the loss is sum over tokens of c_b * m_bt * term_bt with TRL's normalizer c:
    grpo      1 / (B x max(sum_t m_bt, 1))      (the mean over B rows of each row's token mean)
    bnpo      1 / max(sum m, 1)                 (the token mean)
    dr_grpo   1 / (B x max_completion_length)
    dapo      1 / max(num_items_in_batch / world, 1) (1 / max(sum m, 1) without it)
    cispo     -min(r, epsilon_high) (no gradient) * A * logp, normalized as dapo
    sapo      -sigmoid(tau (r - 1)) * 4 / tau * A, normalized as grpo
    luspo     the clipped term, each row's tokens summed and weighed by 1 / B (TRL 1.16's
              (loss * m).sum(-1).mean(); Liger 0.8.5's weighs every position of a row, the
              masked ones too, by sum_t m_bt / T: the same where the mask is all ones, or at
              importance_sampling_level "sequence" without a KL term)
    vespo     -phi(w) (no gradient) * A * logp, normalized as dapo: phi(w) = e^lambda w^k
              e^(-lambda w) of each row's w = exp(sum_t m (logp - old) + sum_t log vllm_is_ratio)
              (the logs clamped to [log 1e-8, 20]), k, lambda = vespo_k_pos, vespo_lambda_pos
              where A >= 0, else the _neg pair; the sampler's IS ratio is inside phi, not a factor
Importance-sampling levels: "token"; "sequence" (GSPO, TRL's and Liger's): r is each row's
exp(sum_t m (logp - old) / max(sum_t m, 1)), differentiated through that mean; "sequence_token"
(GSPO-token, verl's): the same value, each token's log-prob with gradient 1. TRL's delta
(two-sided clipping) is dual_clip = delta, which it equals for delta > 1 + epsilon_high.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ..rl.kl import kl_penalty
from ..rl.linear_logprobs import linear_token_logprobs
from ..rl.linear_logprobs_loss import linear_logprobs_loss, sequences_per_chunk
from ..rl.ppo_loss import ppo_policy_loss, token_advantages

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIPPED_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IS_LEVELS = ("token", "sequence", "sequence_token")
IGNORE_INDEX = -100
OP = "FusedLinearGRPOLoss"


class GRPOTerms(NamedTuple):
    """The detached pieces of a GRPO loss its hosts' metrics are made of, in TRL's shapes:
    coef [B, T] (token level) or [B, 1] (sequence levels), the ratio r; advantages [B, 1] or
    [B, T] as given; kl [B, T] (bias-corrected where asked) or None without a KL term; weights
    [B, T] fp32, the mask's values."""

    coef: torch.Tensor
    advantages: torch.Tensor
    kl: Optional[torch.Tensor]
    weights: torch.Tensor


class LossInputs(NamedTuple):
    """What a GRPO loss reads beside the policy's log-probs, every field [B, ...] by row (None
    where not given): weights [B, T] the mask's values, agg [B, T] the aggregation's per-token
    weights (loss_weights, over the whole batch), advantages [B, 1] / [B, T], old and ref [B, T]
    log-probs (old None: on-policy), is_ratio [B, 1] / [B, T] the sampler's IS weight."""

    weights: torch.Tensor
    agg: torch.Tensor
    advantages: torch.Tensor
    old: Optional[torch.Tensor]
    ref: Optional[torch.Tensor]
    is_ratio: Optional[torch.Tensor]

    def rows(self, start: int, end: int) -> "LossInputs":
        """The rows [start, end) of every field."""
        return LossInputs(*(None if x is None else x[start:end] for x in self))


def loss_weights(loss_type: str, weights: torch.Tensor, max_completion_length: Optional[int],
                 num_items_in_batch=None) -> torch.Tensor:
    """[B, T] fp32 per-token weights c_b * m_bt of TRL's aggregation of ``loss_type`` (see the
    module docstring) from the mask's values weights [B, T]: the loss is sum(w * term)."""
    rows = weights.shape[0]
    if loss_type in ("grpo", "sapo"):
        return weights / (rows * weights.sum(-1, keepdim=True).clamp(min=1.0))
    if loss_type == "luspo":
        return weights / max(rows, 1)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError(f"{OP}: loss_type 'dr_grpo' needs max_completion_length")
        return weights / float(max(rows * max_completion_length, 1))
    if loss_type == "bnpo" or num_items_in_batch is None:
        return weights / weights.sum().clamp(min=1.0)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    items = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=weights.device)
    return weights / (items / world).clamp(min=1.0)


def mask_weights(mask: torch.Tensor, like: torch.Tensor, binary: bool = False) -> torch.Tensor:
    """A host's mask [B, T] (bool, integer or float) as fp32 token weights: its values (TRL's and
    Liger's reading), or 1 where nonzero with ``binary``; a negative value is refused."""
    if mask.shape != like.shape:
        raise ValueError(f"{OP}: attention_mask must have shape {tuple(like.shape)}, got "
                         f"{tuple(mask.shape)}")
    if binary or mask.dtype == torch.bool:
        return (mask != 0).float()
    if (mask < 0).any():
        raise ValueError(f"{OP}: attention_mask must be >= 0 (a token's weight), got a minimum of "
                         f"{mask.min().item()}")
    return mask.float()


def per_row(op: str, name: str, x: Optional[torch.Tensor], like: torch.Tensor):
    """A host's per-row or per-token tensor ([B], [B, 1] or [B, T], like's [B, T]) as [B, 1] or
    [B, T]; anything else is refused (no silent broadcasting)."""
    if x is None:
        return None
    rows, steps = like.shape
    if x.shape == (rows,):
        return x[:, None]
    if x.shape in ((rows, 1), (rows, steps)):
        return x
    raise ValueError(f"{op}: {name} must have shape ({rows},), ({rows}, 1) or ({rows}, {steps}), "
                     f"got {tuple(x.shape)}")


def gamma_weights(log_ratio: torch.Tensor, weights: torch.Tensor, advantages: torch.Tensor,
                  is_ratio: Optional[torch.Tensor], shapes: tuple) -> torch.Tensor:
    """VESPO's phi(w) [B, 1] (or advantages' [B, T]) without gradient: log_ratio [B, T] the
    token log-ratios, weights [B, T] the mask's values, is_ratio [B, 1] / [B, T] or None, shapes
    (k_pos, lambda_pos, k_neg, lambda_neg); see the module docstring."""
    floor = math.log(1e-8)
    with torch.no_grad():
        log_w = (log_ratio.float().clamp(-20.0, 20.0) * weights).sum(-1, keepdim=True)
        if is_ratio is not None:
            log_w = log_w + is_ratio.float().log().clamp(floor, 20.0).sum(-1, keepdim=True)
        log_w = log_w.clamp(floor, 20.0)
        k_pos, lambda_pos, k_neg, lambda_neg = shapes
        nonneg = advantages >= 0
        k = torch.where(nonneg, k_pos, k_neg)
        lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
        return (lam + k * log_w - lam * log_w.exp()).exp().nan_to_num(0.0, 0.0, 0.0)


class FusedLinearGRPOLoss(torch.nn.Module):
    """The GRPO-family loss of hidden states through the LM head, Liger's call shape.

    Constructor: LigerFusedLinearGRPOLoss's arguments, positions and defaults (Liger 0.8.5: beta
    0.04, epsilon_low/high 0.2, loss_type "dapo", temperature 1, use_ref_model True: beta != 0
    then needs ref_per_token_logps or ref_input; False: no reference, the KL term is 0 as
    Liger's). ``compiled`` and ``chunk_size`` (Liger's sequences per torch.compile'd chunk) change
    nothing here: our head streams the vocabulary in chunks of its own byte budget
    (linear_logprobs.CHUNK_BYTES). importance_sampling_level also takes "sequence_token" (see the
    module docstring). Ours only, keyword-only: logit_scale, softcap (the head's, see
    linear_token_logprobs), binary_mask (every nonzero mask value weighs 1), return_stats
    (metrics as a dict), grads_in_forward (None: for fp32 and fp64 heads; True: any head; False:
    never): the head's gradients made in the forward, a sequence at a time while its logits are
    in memory (kernels/rl/linear_logprobs_loss.py: no recompute of the logits in backward, whose
    fp32 matmul is a quarter of the op's time), wherever a whole sequence's logits fit its
    MAX_CHUNK_BYTES; else linear_token_logprobs then the loss. That path's backward runs once
    (a second, after retain_graph=True, is refused: the head's gradients are scaled in place, not
    copied); grads_in_forward=False for a host that differentiates the loss twice.
    """

    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True,
                 chunk_size: int = 1, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 loss_type: str = "dapo", max_completion_length: Optional[int] = None,
                 importance_sampling_level: str = "token", sapo_temperature_pos: float = 1.0,
                 sapo_temperature_neg: float = 1.05, temperature: float = 1.0,
                 delta: Optional[float] = None, use_bias_correction_kl: bool = False,
                 vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                 vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0, *,
                 logit_scale: float = 1.0, softcap: Optional[float] = None,
                 binary_mask: bool = False, return_stats: bool = False,
                 grads_in_forward: Optional[bool] = None):
        super().__init__()
        if grads_in_forward not in (None, True, False):
            raise TypeError(f"{OP}: grads_in_forward must be a bool or None, got "
                            f"{grads_in_forward!r}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"{OP}: loss_type {loss_type!r} has no fused mapping; "
                             f"expected one of {LOSS_TYPES}")
        if importance_sampling_level not in IS_LEVELS:
            raise ValueError(f"{OP}: importance_sampling_level must be one of {IS_LEVELS}, got "
                             f"{importance_sampling_level!r}")
        if delta is not None and not delta > 1 + epsilon_high:
            raise ValueError(f"{OP}: delta must exceed 1 + epsilon_high ({1 + epsilon_high}), "
                             f"got {delta!r}")
        if min(sapo_temperature_pos, sapo_temperature_neg) <= 0:
            raise ValueError(f"{OP}: the sapo temperatures must be positive, got "
                             f"{(sapo_temperature_pos, sapo_temperature_neg)}")
        self.beta, self.loss_type, self.chunk_size = beta, loss_type, chunk_size
        self.compiled, self.use_ref_model, self.binary_mask = compiled, use_ref_model, binary_mask
        self.epsilon_low, self.epsilon_high, self.delta = epsilon_low, epsilon_high, delta
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperatures = (sapo_temperature_pos, sapo_temperature_neg)
        self.vespo_shapes = (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
        self.temperature, self.logit_scale, self.softcap = temperature, logit_scale, softcap
        self.use_bias_correction_kl, self.return_stats = use_bias_correction_kl, return_stats
        self.grads_in_forward = grads_in_forward

    def forward(self, _input: torch.Tensor, lin_weight: torch.Tensor,
                selected_token_ids: torch.Tensor, attention_mask: torch.Tensor,
                advantages: torch.Tensor, bias: Optional[torch.Tensor] = None,
                ref_per_token_logps: Optional[torch.Tensor] = None,
                old_per_token_logps: Optional[torch.Tensor] = None,
                ref_input: Optional[torch.Tensor] = None,
                ref_weight: Optional[torch.Tensor] = None, ref_bias: Optional[torch.Tensor] = None,
                vllm_is_ratio: Optional[torch.Tensor] = None, num_items_in_batch=None):
        """(loss [], metrics): _input [B, T, H], lin_weight [V, H], selected_token_ids [B, T],
        attention_mask [B, T] (the completion mask; its values weigh the tokens), advantages
        [B] / [B, 1] / [B, T], optional bias [V], ref_per_token_logps and old_per_token_logps
        [B, T] (old: none = on-policy), vllm_is_ratio [B] / [B, 1] / [B, T] (the sampler's IS
        weight of the policy term). The reference as Liger takes it: ref_per_token_logps, else
        ref_input [B, T, Hr] through ref_weight [V, Hr] (+ ref_bias) without gradient; ref_weight
        and ref_bias without ref_input are not read. metrics: Liger's list [mean KL (when
        beta != 0; 0.0 with use_ref_model=False), clip ratio], or with return_stats a dict (kl,
        clip_ratio, clipfrac_low, clipfrac_high, entropy)."""
        if _input.dim() != 3 or selected_token_ids.shape != _input.shape[:2]:
            raise ValueError(f"{OP}: expected _input [B, T, H] and selected_token_ids [B, T], "
                             f"got {tuple(_input.shape)} and {tuple(selected_token_ids.shape)}")
        weights = mask_weights(attention_mask, selected_token_ids, self.binary_mask)
        labels = torch.where(weights != 0, selected_token_ids, IGNORE_INDEX)
        head = dict(temperature=self.temperature, logit_scale=self.logit_scale,
                    softcap=self.softcap)
        if self.use_ref_model and ref_per_token_logps is None and ref_input is not None:
            if ref_weight is None:
                raise ValueError(f"{OP}: ref_input needs ref_weight (the reference's LM head)")
            with torch.no_grad():
                ref_per_token_logps = linear_token_logprobs(ref_input, ref_weight, labels,
                                                            bias=ref_bias, **head)
        inputs = self._inputs(weights, advantages, old_per_token_logps, ref_per_token_logps,
                              vllm_is_ratio, num_items_in_batch)
        rows = self._rows_per_chunk(_input, lin_weight, bias)
        if rows is None:
            logp, entropy = linear_token_logprobs(_input, lin_weight, labels, bias=bias,
                                                  return_entropy=True, **head)
            loss, terms = self._loss(logp, inputs)
            return loss, self._metrics(terms, entropy)
        batch, steps, width = _input.shape
        pieces = []

        def row_loss(logp, start, end):
            loss, terms = self._loss(logp.view(-1, steps), inputs.rows(start // steps,
                                                                       end // steps))
            pieces.append(terms)
            return loss
        bounds = [(b * steps, min(b + rows, batch) * steps) for b in range(0, batch, rows)]
        loss, _, entropy = linear_logprobs_loss(
            _input.reshape(-1, width), lin_weight, labels.reshape(-1), row_loss, bounds,
            bias=bias, return_entropy=True, **head)
        terms = GRPOTerms(*(None if parts[0] is None else torch.cat(parts)
                            for parts in zip(*pieces)))
        return loss, self._metrics(terms, entropy.view(batch, steps))

    def _rows_per_chunk(self, hidden, weight, bias) -> Optional[int]:
        """Sequences per row chunk of the gradients-in-forward path (grads_in_forward: by default
        fp32 and fp64 heads, not 16-bit ones), or None for linear_token_logprobs then the loss:
        without gradients, under torch.compile (which traces the op, not this loop) or an
        autocast (which would cast the head's matmuls), with mixed dtypes, for an empty batch, or
        where one sequence's logits [T, V] in the compute dtype pass
        linear_logprobs_loss.MAX_CHUNK_BYTES."""
        dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
        wanted = self.grads_in_forward
        if wanted is None:
            wanted = dtypes <= {torch.float32} or dtypes <= {torch.float64}
        if (not wanted or len(dtypes) != 1 or not torch.is_grad_enabled()
                or torch.compiler.is_compiling() or hidden.shape[0] * hidden.shape[1] == 0
                or torch.is_autocast_enabled(hidden.device.type)
                or not any(t is not None and t.requires_grad for t in (hidden, weight, bias))):
            return None
        itemsize = 8 if hidden.dtype == torch.float64 else 4
        return sequences_per_chunk(hidden.shape[1], weight.shape[0], itemsize)

    def loss_from_logps(self, logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                        old_per_token_logps: Optional[torch.Tensor] = None,
                        ref_per_token_logps: Optional[torch.Tensor] = None,
                        vllm_is_ratio: Optional[torch.Tensor] = None, num_items_in_batch=None
                        ) -> tuple[torch.Tensor, GRPOTerms]:
        """(loss [], GRPOTerms) from the policy's log-probs logp [B, T] (differentiable) and
        mask [B, T] (its values weigh the tokens): the loss of forward after its head, for a host
        that makes the log-probs itself (FusedGRPOTrainer)."""
        inputs = self._inputs(mask_weights(mask, logp, self.binary_mask), advantages,
                              old_per_token_logps, ref_per_token_logps, vllm_is_ratio,
                              num_items_in_batch, like=logp)
        return self._loss(logp, inputs)

    def _inputs(self, weights, advantages, old, ref, is_ratio, num_items_in_batch,
                like=None) -> LossInputs:
        """The LossInputs of a batch whose mask's values are weights [B, T] (like: the log-probs,
        whose shape the per-row tensors are read against; default weights)."""
        like = weights if like is None else like
        if self.beta != 0.0 and self.use_ref_model and ref is None:
            raise ValueError(f"{OP}: beta={self.beta} needs ref_per_token_logps (or "
                             "use_ref_model=False for no reference, or beta=0)")
        advantages = per_row(OP, "advantages", advantages, like).detach()
        is_ratio = per_row(OP, "vllm_is_ratio", is_ratio, like)
        agg = loss_weights(self.loss_type, weights, self.max_completion_length,
                           num_items_in_batch)
        return LossInputs(weights, agg, advantages,
                          None if old is None else old.detach(),
                          None if ref is None else ref.detach(),
                          None if is_ratio is None else is_ratio.detach())

    def _loss(self, logp: torch.Tensor, inputs: LossInputs) -> tuple[torch.Tensor, GRPOTerms]:
        """(loss [], GRPOTerms) of the rows logp [B, T] (differentiable) and their inputs: a sum
        over the rows (the aggregation's weights are the whole batch's, in inputs.agg)."""
        weights, agg_weight, advantages = inputs.weights, inputs.agg, inputs.advantages
        old = logp.detach() if inputs.old is None else inputs.old
        is_ratio = inputs.is_ratio
        policy_weight = agg_weight if is_ratio is None else agg_weight * is_ratio.float()
        log_ratio = self._log_ratio(logp.float(), old.float(), weights)
        if self.loss_type == "vespo":
            # the sampler's ratio is inside phi (TRL's and Liger's), not a factor of the term
            phi = gamma_weights(logp.float() - old.float(), weights, advantages, is_ratio,
                                self.vespo_shapes)
            loss = -(phi * token_advantages(OP, advantages, logp) * logp * agg_weight).sum()
        else:
            loss = self._policy_loss(logp, log_ratio, advantages, policy_weight)
        kl = None
        if self.beta != 0.0:
            # Liger without a reference model: the policy's own log-probs, a KL of 0
            ref = inputs.ref if self.use_ref_model else logp.detach()
            kl = kl_penalty(logp, ref, estimator="k3", mask=weights)
            if self.use_bias_correction_kl:
                kl = kl * log_ratio.exp()
            loss = loss + self.beta * (kl * agg_weight).sum()
        kl = None if kl is None else kl.detach()
        return loss, GRPOTerms(log_ratio.detach().exp(), advantages, kl, weights)

    def _log_ratio(self, logp, old, weights):
        """log r, differentiable: [B, T] at token level, [B, 1] at the sequence levels (TRL's
        weighted mean; "sequence_token" passes each token's gradient straight to its logp)."""
        log_ratio = logp - old
        if self.importance_sampling_level == "token":
            return log_ratio
        mean = (log_ratio * weights).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True).clamp(
            min=1.0)
        if self.importance_sampling_level == "sequence":
            return mean
        return mean.detach() + (logp - logp.detach())

    def _policy_loss(self, logp, log_ratio, advantages, token_weight):
        """sum over tokens of token_weight [B, T] * the policy term. The clipped surrogate runs on
        our PPO kernel at agg "token-sum": it is linear in A for a positive weight, so the weight
        scales the advantages, and the log-ratio goes in as logp against 0."""
        token_adv = token_advantages(OP, advantages, logp)
        if self.loss_type in CLIPPED_TYPES:
            ratio_logp = log_ratio.expand_as(logp)
            loss, _ = ppo_policy_loss(ratio_logp, torch.zeros_like(ratio_logp),
                                      token_adv * token_weight, token_weight != 0,
                                      clip_eps=self.epsilon_low, clip_eps_high=self.epsilon_high,
                                      dual_clip=self.delta, agg="token-sum")
            return loss
        ratio = log_ratio.exp()
        if self.loss_type == "cispo":
            per_token = -ratio.detach().clamp(max=self.epsilon_high) * token_adv * logp
        else:  # sapo
            pos, neg = self.sapo_temperatures
            tau = torch.where(token_adv > 0, pos, neg)
            per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * token_adv
        return (per_token * token_weight).sum()

    def clipped(self, terms: GRPOTerms) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) bool, TRL's broadcast of coef against advantages: the tokens (rows at the
        sequence levels) whose ratio the clip holds, as TRL's and Liger's metrics count them."""
        coef, adv = terms.coef, terms.advantages
        if self.loss_type == "cispo":
            return torch.zeros_like(coef * adv, dtype=torch.bool), (coef > self.epsilon_high) & (
                adv > 0)
        if self.loss_type in ("sapo", "vespo"):
            none = torch.zeros_like(coef * adv, dtype=torch.bool)
            return none, none
        return ((coef < 1 - self.epsilon_low) & (adv < 0),
                (coef > 1 + self.epsilon_high) & (adv > 0))

    def _metrics(self, terms: GRPOTerms, entropy: torch.Tensor):
        """Liger's metrics: means over the tokens weighted by the mask, divided by
        max(sum of the mask, 1)."""
        weights = terms.weights
        total = weights.sum().clamp(min=1.0)

        def mean(x):
            return (x.float().expand_as(weights) * weights).sum() / total
        low, high = self.clipped(terms)
        kl = None if terms.kl is None else mean(terms.kl)
        clip_ratio = mean(low | high)
        if self.return_stats:
            return {"kl": kl, "clip_ratio": clip_ratio, "clipfrac_low": mean(low),
                    "clipfrac_high": mean(high), "entropy": mean(entropy.detach())}
        return ([] if kl is None else [kl]) + [clip_ratio]
