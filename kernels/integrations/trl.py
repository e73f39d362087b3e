"""TRL in one line: ``from fusedrl.kernels.integrations.trl import FusedGRPOTrainer`` in place of
``trl.GRPOTrainer`` (TRL 1.x). Importing this module imports trl.

Two swaps, everything else is TRL's:
  the fused LM head   TRL patches the model's forward (add_fused_lm_head) so that
                      ``model(..., labels=, fused_lm_head=True)`` returns per-token log-probs and
                      entropy; ours wraps that forward and answers with linear_token_logprobs
                      (TRL's temperature, the model's logit_scale and final_logit_softcapping)
  _compute_loss       FusedLinearGRPOLoss.loss_from_logps (our PPO loss, KL and aggregation) with
                      TRL's normalizers and metrics
What ours does not cover falls back to TRL's own _compute_loss, said once in the log: loss types
luspo and vespo (FusedLinearGRPOLoss has them; this trainer does not log their metrics),
off_policy_mask_threshold, top_entropy_quantile < 1, the entropy bonus,
delta <= 1 + epsilon_high. A mixture of experts' load-balancing loss (router_aux_loss_coef) is
added as TRL adds it; TRL's cast_lm_head_to_fp32 runs our head in fp32.
"""
from __future__ import annotations

import functools
import logging
import types

import torch

from .trl_required import require_trl

require_trl(__name__)
from trl import GRPOTrainer
from trl.trainer.utils import FusedCausalLMOutput, nanmax, nanmin

from ..rl.linear_logprobs import linear_token_logprobs
from .grpo_loss import CLIPPED_TYPES, FusedLinearGRPOLoss
from .lm_head import head_transform

log = logging.getLogger(__name__)
# The loss types whose TRL normalizers and metrics _compute_loss below reproduces.
TRAINER_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")


def router_aux_loss(model, text, backbone_outputs, attention_mask):
    """A mixture of experts' load-balancing loss from the backbone's router logits, as TRL's
    fused head (and every MoE family of transformers) computes it."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    num_experts = getattr(text, "num_experts", None) or getattr(model, "num_experts")
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts,
                                    text.num_experts_per_tok, attention_mask)


def add_our_head(model, temperature: float, cast_lm_head_to_fp32: bool = False) -> None:
    """Answer ``model(..., labels=, fused_lm_head=True)`` with our fused head; any other call goes
    to the forward in place (TRL's, which goes on to the model's own). With
    cast_lm_head_to_fp32 the head runs in fp32 outside autocast (TRL's option)."""
    inner_forward = model.forward
    logit_scale, softcap = head_transform(model.config)
    text = model.config.get_text_config()

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, **kwargs):
        if not fused_lm_head:
            return inner_forward(*args, labels=labels, shift_labels=shift_labels, **kwargs)
        kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        if getattr(text, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        outputs = self.base_model(*args, **kwargs)
        hidden = outputs.last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        weight, bias, labels = head.weight, head.bias, labels.to(head.weight.device)
        device = weight.device.type
        if cast_lm_head_to_fp32:
            hidden, weight = hidden.float(), weight.float()
            bias = None if bias is None else bias.float()
        elif torch.is_autocast_enabled(device):
            # Both operands in the autocast dtype and autocast off inside: the backward's recompute
            # must see the forward's dtype (autocast is not active during backward).
            dtype = torch.get_autocast_dtype(device)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            logp, entropy = linear_token_logprobs(
                hidden.to(weight.device), weight, labels, bias=bias, temperature=temperature,
                return_entropy=True, logit_scale=logit_scale, softcap=softcap)
        mask = labels != -100
        loss, aux_loss = -logp.sum() / mask.sum().clamp(min=1), None
        if kwargs.get("output_router_logits"):
            aux_loss = router_aux_loss(self, text, outputs, kwargs.get("attention_mask"))
            loss = loss + getattr(text, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=logp, entropy=entropy, label_mask=mask,
                                   aux_loss=aux_loss)

    model.forward = types.MethodType(forward, model)


def fallback_reasons(trainer) -> list[str]:
    """What in the trainer's configuration our loss does not cover (empty: ours runs)."""
    args = trainer.args
    reasons = []
    if trainer.loss_type not in TRAINER_LOSS_TYPES:
        reasons.append(f"loss_type {trainer.loss_type!r}")
    if getattr(trainer, "off_policy_mask_threshold", None) is not None:
        reasons.append("off_policy_mask_threshold")
    if getattr(trainer, "top_entropy_quantile", 1.0) < 1.0:
        reasons.append("top_entropy_quantile < 1")
    if getattr(trainer, "_entropy_bonus_enabled", False):
        reasons.append("the entropy bonus")
    delta = getattr(args, "delta", None)
    if delta is not None and not delta > 1 + trainer.epsilon_high:
        reasons.append("delta <= 1 + epsilon_high")
    return reasons


class FusedGRPOTrainer(GRPOTrainer):
    """trl.GRPOTrainer with our fused LM head and loss (see the module docstring); same
    arguments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for model in (self.model, self.ref_model):
            if model is not None:
                base = model.get_base_model() if hasattr(model, "get_base_model") else model
                add_our_head(base, self.temperature, self.args.cast_lm_head_to_fp32)
        self._fallback = fallback_reasons(self)
        if self._fallback:
            log.warning("FusedGRPOTrainer: TRL's own loss runs (ours does not cover %s); the LM "
                        "head is still ours", ", ".join(self._fallback))
        self.fused_loss = FusedLinearGRPOLoss(
            beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            loss_type=self.loss_type if not self._fallback else "dapo",
            max_completion_length=self.max_completion_length,
            importance_sampling_level=self.importance_sampling_level,
            sapo_temperature_pos=getattr(self.args, "sapo_temperature_pos", 1.0),
            sapo_temperature_neg=getattr(self.args, "sapo_temperature_neg", 1.05),
            temperature=self.temperature, delta=None if self._fallback else self.args.delta,
            use_bias_correction_kl=self.args.use_bias_correction_kl)

    def _compute_loss(self, model, inputs):
        if self._fallback:
            return super()._compute_loss(model, inputs)
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else \
            completion_mask * inputs["tool_mask"]
        logp, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1), completion_ids.size(1),
            compute_entropy=True, compute_aux_loss=self.aux_loss_enabled)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        items = None
        if self.loss_type in ("dapo", "cispo"):
            items = inputs["num_items_in_batch"].clamp(min=1.0)
            if mode == "train":
                items = items * self.current_gradient_accumulation_steps \
                    / self.args.steps_per_generation
        is_ratio = (inputs["importance_sampling_ratio"]
                    if self.use_vllm and self.vllm_importance_sampling_correction else None)
        loss, terms = self.fused_loss.loss_from_logps(
            logp, mask, inputs["advantages"], inputs.get("old_per_token_logps"),
            inputs.get("ref_per_token_logps"), is_ratio, items)
        if self.loss_type not in ("dapo", "cispo"):
            loss = loss / accumulation
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_metrics(mode, terms, entropies)
        return loss

    def _log_metrics(self, mode, terms, entropies):
        """TRL's metrics of a step, by TRL's names: kl, entropy and the loss type's clip ratios
        (global means over the mask's weights; over the rows where a value is per row)."""
        mask = terms.weights

        def global_mean(x):
            if x.shape[1] == 1:
                local = torch.stack([x.float().sum(), torch.tensor(float(x.shape[0]),
                                                                   device=x.device)])
            else:
                local = torch.stack([(x * mask).sum(), mask.sum()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def row_means(x):
            x = x.float()
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)
        metrics = self._metrics[mode]
        if terms.kl is not None:
            metrics["kl"].append(global_mean(terms.kl))
        metrics["entropy"].append(global_mean(entropies.detach()))
        low, high = self.fused_loss.clipped(terms)
        if self.loss_type in CLIPPED_TYPES:
            metrics["clip_ratio/low_mean"].append(global_mean(low.float()))
            metrics["clip_ratio/high_mean"].append(global_mean(high.float()))
            metrics["clip_ratio/region_mean"].append(global_mean((low | high).float()))
            gather = self.accelerator.gather
            metrics["clip_ratio/low_min"].append(nanmin(gather(row_means(low))).item())
            metrics["clip_ratio/high_max"].append(nanmax(gather(row_means(high))).item())
        elif self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(global_mean(high.float()))


from .trl_distill import FusedDistillationTrainer  # noqa: E402,F401  (re-exported)
