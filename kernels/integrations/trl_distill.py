"""``FusedDistillationTrainer``: TRL 1.x's ``DistillationTrainer`` with its divergence on our
kernel (re-exported by fusedrl.kernels.integrations.trl; importing this module imports trl).

One swap, everything else is TRL's (generation, the teacher's forward, accumulation, metrics):
``_compute_loss`` takes both models' last hidden states as TRL does (its _get_last_hidden_state,
the teacher's under no_grad through its wrapper) and hands them with both LM heads to
chunked_divergence_loss, TRL's _chunked_divergence_loss at the same arguments: the model's
logit_scale and final_logit_softcapping read as TRL reads them, TRL's beta and temperature.
"""
from __future__ import annotations

import torch

from .trl_required import require_trl

require_trl(__name__)
from trl import DistillationTrainer

from .distill import chunked_divergence_loss
from .lm_head import head_transform

# The multimodal fields TRL's _compute_loss forwards to both backbones, as it names them.
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes",
                   "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


class FusedDistillationTrainer(DistillationTrainer):
    """trl.DistillationTrainer with linear_distill_divergence as its loss; same arguments."""

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        keep = inputs["completion_ids"].size(1)
        extra = {k: inputs[k] for k in MULTIMODAL_KEYS if k in inputs}
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids,
                                                     attention_mask, keep, **extra)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model, unwrapped_teacher, self._get_last_hidden_state,
                unwrapped_teacher, input_ids, attention_mask, keep, **extra)
        student_head = unwrapped_student.get_output_embeddings()
        teacher_head = unwrapped_teacher.get_output_embeddings()
        if student_head.weight.device != teacher_head.weight.device:
            raise ValueError(f"FusedDistillationTrainer: the student's lm_head is on "
                             f"{student_head.weight.device} but the teacher's on "
                             f"{teacher_head.weight.device}; place both on one device")
        device = student_head.weight.device
        student_scale, student_cap = head_transform(unwrapped_student.config)
        teacher_scale, teacher_cap = head_transform(unwrapped_teacher.config)
        loss, entropy_sum, n_valid = chunked_divergence_loss(
            student_hidden.to(device), teacher_hidden.to(device), student_head.weight,
            teacher_head.weight, loss_mask.to(device), self.beta,
            num_items_in_batch=num_items_in_batch, student_lm_head_bias=student_head.bias,
            teacher_lm_head_bias=teacher_head.bias, student_logit_scale=student_scale,
            teacher_logit_scale=teacher_scale, student_final_logit_softcapping=student_cap,
            teacher_final_logit_softcapping=teacher_cap, temperature=self.temperature)
        return loss, entropy_sum.detach(), n_valid
