"""linear_distill_divergence at the hosts' call shapes, importing neither host:

  chunked_divergence_loss   TRL 1.x's ``_chunked_divergence_loss`` (trl/trainer/
                            distillation_trainer.py): the same arguments, the same
                            (loss, entropy_sum, n_valid) back
  FusedLinearJSDLoss        Liger's ``LigerFusedLinearJSD(jsd_beta, ignore_index, temperature)``
                            module, called as ``(student_input, student_weight, teacher_input,
                            teacher_weight, shift_labels)``

Liger 0.8.5's ``jsd_beta`` is TRL's ``beta`` (both read from their sources, and checked side by
side in tests/kernels/integrations/test_distill_hosts.py): 0 the forward KL(teacher || student),
1 the reverse KL(student || teacher), in between beta KL(p_t || m) + (1 - beta) KL(p_s || m) with
m = beta p_t + (1 - beta) p_s. Liger's default is 0.5, TRL's 1.0. Liger takes no bias, logit scale
or soft cap, and means over the rows whose label is not ignore_index (every row without labels).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..rl.distill import linear_distill_divergence


def _full(weight, bias):
    """An FSDP2 head (a DTensor) as one plain tensor: gathered once here, not once per chunk."""
    if isinstance(weight, torch.distributed.tensor.DTensor):
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


class FusedLinearJSDLoss(torch.nn.Module):
    """Liger's LigerFusedLinearJSD: ``FusedLinearJSDLoss(jsd_beta, ignore_index, temperature)
    (student_input [BT, Hs], student_weight [V, Hs], teacher_input [BT, Ht], teacher_weight
    [V, Ht], shift_labels [BT] or None)`` -> the divergence's 0-dim mean over the rows whose label
    is not ignore_index (over every row without labels). jsd_beta is TRL's beta (the module
    docstring)."""

    def __init__(self, jsd_beta: float = 0.5, ignore_index: int = -100,
                 temperature: float = 1.0):
        super().__init__()
        self.jsd_beta, self.ignore_index, self.temperature = jsd_beta, ignore_index, temperature

    def forward(self, student_input, student_weight, teacher_input, teacher_weight,
                shift_labels: Optional[torch.Tensor] = None):
        mask = None if shift_labels is None else shift_labels != self.ignore_index
        return linear_distill_divergence(student_input, student_weight, teacher_input,
                                         teacher_weight, mask, self.jsd_beta,
                                         self.temperature).divergence
