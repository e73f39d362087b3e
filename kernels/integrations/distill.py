"""linear_distill_divergence at the hosts' call shapes, importing neither host:

  chunked_divergence_loss   TRL 1.x's ``_chunked_divergence_loss`` (trl/trainer/
                            distillation_trainer.py): the same arguments, the same
                            (loss, entropy_sum, n_valid) back
  FusedLinearJSDLoss        Liger's ``LigerFusedLinearJSDLoss`` (liger_kernel.chunked_loss): its
                            constructor and forward, positions and defaults; the soft (JSD) and
                            hard (cross-entropy) terms, the student's and teacher's biases
  FusedLinearJSD            Liger's ``LigerFusedLinearJSD`` (liger_kernel.transformers):
                            ``(jsd_beta, ignore_index, temperature, accum_dtype)``, called as
                            ``(student_input, student_weight, teacher_input, teacher_weight,
                            shift_labels)``

Liger 0.8.5's ``beta`` / ``jsd_beta`` is TRL's ``beta`` (both read from their sources, and checked
side by side in tests/kernels/integrations/test_distill_hosts.py): 0 the forward
KL(teacher || student), 1 the reverse KL(student || teacher), in between
beta KL(p_t || m) + (1 - beta) KL(p_s || m) with m = beta p_t + (1 - beta) p_s. Liger's default is
0.5, TRL's 1.0. Both Liger modules mean over the rows whose label is not ignore_index (every row
of LigerFusedLinearJSD without labels).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..rl.distill import linear_distill_divergence
from ..rl.linear_logprobs import linear_token_logprobs


def _full(weight, bias):
    """An FSDP2 head (a DTensor) as one plain tensor: gathered once here, not once per chunk."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor   # not imported by ``import torch``
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
    return weight, bias


def chunked_divergence_loss(student_hidden_states: torch.Tensor,
                            teacher_hidden_states: torch.Tensor,
                            student_lm_head_weight: torch.Tensor,
                            teacher_lm_head_weight: torch.Tensor,
                            completion_mask: torch.Tensor, beta: float,
                            num_items_in_batch=None,
                            student_lm_head_bias: Optional[torch.Tensor] = None,
                            teacher_lm_head_bias: Optional[torch.Tensor] = None,
                            student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                            student_final_logit_softcapping: Optional[float] = None,
                            teacher_final_logit_softcapping: Optional[float] = None,
                            temperature: float = 1.0):
    """TRL's _chunked_divergence_loss on linear_distill_divergence: hidden states [B, K, Hs] /
    [B, K, Ht], heads [V, Hs] / [V, Ht], completion_mask [B, K] (nonzero = in the loss).
    Returns (loss 0-dim: sum / num_items_in_batch when given, else the mean over valid positions;
    entropy_sum 0-dim, the student's entropy summed over them, no grad; n_valid 0-dim int)."""
    student_weight, student_bias = _full(student_lm_head_weight, student_lm_head_bias)
    teacher_weight, teacher_bias = _full(teacher_lm_head_weight, teacher_lm_head_bias)
    loss, entropy = linear_distill_divergence(
        student_hidden_states, student_weight.to(student_hidden_states.dtype),
        teacher_hidden_states, teacher_weight.to(teacher_hidden_states.dtype), completion_mask,
        beta, temperature, num_items_in_batch=num_items_in_batch, student_bias=student_bias,
        teacher_bias=teacher_bias, student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale, student_softcap=student_final_logit_softcapping,
        teacher_softcap=teacher_final_logit_softcapping)
    return loss, entropy.sum(), (completion_mask != 0).sum()


def _padded(weight, bias, vocab: int):
    """The student's head [V, H] (and bias) with zero rows to the teacher's vocabulary ``vocab``
    (Liger's zero logits for the ids only the teacher's padded head has)."""
    extra = vocab - weight.shape[0]
    if extra < 0:
        raise ValueError(f"FusedLinearJSDLoss: teacher_weight has {vocab} rows, fewer than "
                         f"student_weight's {weight.shape[0]}")
    if extra == 0:
        return weight, bias
    weight = torch.cat([weight, weight.new_zeros(extra, weight.shape[1])])
    return weight, None if bias is None else torch.cat([bias, bias.new_zeros(extra)])


class FusedLinearJSDLoss(torch.nn.Module):
    """Liger's LigerFusedLinearJSDLoss: ``weight_hard_loss * hard + weight_soft_loss * soft`` of
    student_input [BT, Hs] through student_weight [V, Hs] (+ student_bias) against teacher_input
    [BT, Ht] through teacher_weight [Vt, Ht] (+ teacher_bias), Vt >= V (the student's logits
    padded with zeros to Vt, Liger's), each term a sum over the rows whose true_labels [BT] is
    not ignore_index divided by their count (at least 1):
      soft   TRL's divergence at ``beta`` between the heads' softmax(logits / temperature)
      hard   the student's cross-entropy at true_labels, of its logits at temperature 1
    Returns the 0-dim loss, or (loss, soft, hard) with return_soft_hard_loss. ``compiled`` and
    ``chunk_size`` (Liger's rows per torch.compile'd chunk) change nothing here: our kernels
    chunk by their own byte budget. The hard term is not evaluated when it weighs 0 and is not
    returned (as Liger)."""

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5,
                 beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                 compiled: bool = True, chunk_size: int = 1024,
                 return_soft_hard_loss: bool = False):
        super().__init__()
        self.weight_hard_loss, self.weight_soft_loss = weight_hard_loss, weight_soft_loss
        self.beta, self.ignore_index, self.temperature = beta, ignore_index, temperature
        self.compiled, self.chunk_size = compiled, chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss

    def forward(self, student_input: torch.Tensor, student_weight: torch.Tensor,
                teacher_input: torch.Tensor, teacher_weight: torch.Tensor,
                true_labels: torch.Tensor, student_bias: Optional[torch.Tensor] = None,
                teacher_bias: Optional[torch.Tensor] = None):
        valid = true_labels != self.ignore_index
        weight, bias = _padded(student_weight, student_bias, teacher_weight.shape[0])
        soft = linear_distill_divergence(student_input, weight, teacher_input, teacher_weight,
                                         valid, self.beta, self.temperature, student_bias=bias,
                                         teacher_bias=teacher_bias).divergence
        hard = soft.new_zeros(())
        if self.weight_hard_loss != 0 or self.return_soft_hard_loss:
            logp = linear_token_logprobs(student_input, student_weight, true_labels,
                                         bias=student_bias, ignore_index=self.ignore_index)
            hard = -torch.where(valid, logp, 0.0).sum() / valid.sum().clamp(min=1)
        loss = self.weight_hard_loss * hard + self.weight_soft_loss * soft
        return (loss, soft, hard) if self.return_soft_hard_loss else loss


class FusedLinearJSD(torch.nn.Module):
    """Liger's LigerFusedLinearJSD: ``FusedLinearJSD(jsd_beta, ignore_index, temperature,
    accum_dtype)(student_input [BT, Hs], student_weight [V, Hs], teacher_input [BT, Ht],
    teacher_weight [V, Ht], shift_labels [BT] or None)`` -> the divergence's 0-dim mean over the
    rows whose label is not ignore_index (over every row without labels). jsd_beta is TRL's beta
    (the module docstring). accum_dtype (Liger's dtype of the head's gradient accumulator) changes
    nothing: ours accumulates in fp32 and returns each gradient in its input's dtype."""

    def __init__(self, jsd_beta: float = 0.5, ignore_index: int = -100,
                 temperature: float = 1.0, accum_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.jsd_beta, self.ignore_index, self.temperature = jsd_beta, ignore_index, temperature
        self.accum_dtype = accum_dtype

    def forward(self, student_input: torch.Tensor, student_weight: torch.Tensor,
                teacher_input: torch.Tensor, teacher_weight: torch.Tensor,
                shift_labels: Optional[torch.Tensor]):
        mask = None if shift_labels is None else shift_labels != self.ignore_index
        return linear_distill_divergence(student_input, student_weight, teacher_input,
                                         teacher_weight, mask, self.jsd_beta,
                                         self.temperature).divergence
