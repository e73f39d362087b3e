"""The distillation divergence in plain PyTorch, ``chunk_size`` rows at a time: the "torch" backend
of linear_distill_divergence, and every backend's path for what the Triton kernels do not take
(soft-capped logits, the top-K mode).

Forward makes a row chunk's logits of both heads [C, V], evaluates the per-token terms of
reference/distill.py on them and keeps two floats per row (divergence, student entropy). Backward
remakes each chunk, differentiates the chunk's terms with respect to the student's logits only
(autograd over [C, V], then dropped) and feeds that gradient to the head's two matmuls: the extra
memory is a few [C, V] buffers whatever N is, plus the fp32 gradient of the head. The teacher's
logits are made under no_grad and nothing of the teacher is saved but its inputs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..reference.distill import full_terms, scaled_logits, top_k_terms
from ..reference.statistics import compute_dtype
from .linear_logprobs_torch import HeadGrads


class DistillSpec(NamedTuple):
    """The divergence's options as the chunked path takes them (validated by the caller)."""
    mode: str                       # "full" or "top_k"
    beta: float
    temperature: float
    student_logit_scale: float
    teacher_logit_scale: float
    student_softcap: Optional[float]
    teacher_softcap: Optional[float]
    chunk_size: int


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _student_logits(pre, spec: DistillSpec):
    """The student's scaled logits from its raw head output pre [C, V] (compute dtype)."""
    z = pre * spec.student_logit_scale
    if spec.student_softcap is not None:
        z = spec.student_softcap * torch.tanh(z / spec.student_softcap)
    return z / spec.temperature


def _chunk_terms(zs, teacher, start, end, spec: DistillSpec):
    """(divergence, entropy) [C] of the rows [start, end): zs [C, V] the student's scaled logits,
    teacher (hidden, weight, bias, labels, topk_ids, topk_logprobs)."""
    hidden, weight, bias, _, topk_ids, topk_logprobs = teacher
    if spec.mode == "top_k":
        return top_k_terms(zs, topk_ids[start:end], topk_logprobs[start:end], spec.beta)
    with torch.no_grad():
        zt = scaled_logits(hidden[start:end], weight, bias, spec.teacher_logit_scale,
                           spec.teacher_softcap, spec.temperature)
    return full_terms(zs, zt, spec.beta)


class ChunkedDistill(torch.autograd.Function):
    """(divergence [N], entropy [N]) of student hidden [N, Hs] through its head [V, Hs] (+ bias)
    against the teacher, 0 where valid [N] is False; differentiable w.r.t. the student only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, valid, teacher, spec: DistillSpec):
        cd = compute_dtype(hidden)
        n_rows = hidden.shape[0]
        divergence = hidden.new_zeros(n_rows, dtype=cd)
        entropy = hidden.new_zeros(n_rows, dtype=cd)
        for start, end in _chunks(n_rows, spec.chunk_size):
            zs = _student_logits(F.linear(hidden[start:end], weight, bias).to(cd), spec)
            div, ent = _chunk_terms(zs, teacher, start, end, spec)
            divergence[start:end] = torch.where(valid[start:end], div, 0.0)
            entropy[start:end] = torch.where(valid[start:end], ent, 0.0)
        ctx.save_for_backward(hidden, weight, bias, valid)
        ctx.teacher, ctx.spec = teacher, spec
        ctx.mark_non_differentiable(entropy)
        return divergence, entropy

    @staticmethod
    def backward(ctx, grad_divergence, _grad_entropy):
        hidden, weight, bias, valid = ctx.saved_tensors
        spec = ctx.spec
        cd = compute_dtype(hidden)
        grads = HeadGrads(hidden, weight, ctx.needs_input_grad[:3])
        g_all = torch.where(valid, grad_divergence.to(cd), 0.0)
        for start, end in _chunks(hidden.shape[0], spec.chunk_size):
            h = hidden[start:end]
            with torch.enable_grad():
                pre = F.linear(h, weight, bias).to(cd).detach().requires_grad_()   # [C, V]
                div, _ = _chunk_terms(_student_logits(pre, spec), ctx.teacher, start, end, spec)
                (grad,) = torch.autograd.grad(div, pre, g_all[start:end])           # [C, V]
            grads.add(grad, h, start, end)
        return grads.result() + (None,) * 3


def chunked_distill(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    valid: torch.Tensor, teacher: tuple, spec: DistillSpec):
    """(divergence [N], entropy [N]) in the compute dtype (fp64 for fp64 inputs, else fp32), 0
    where valid is False: hidden [N, Hs], weight [V, Hs] of one dtype, valid [N] bool, teacher
    (hidden [N, Ht], weight [V, Ht], bias [V] or None, labels [N], topk_ids [N, K],
    topk_logprobs [N, K]), the ones the mode does not read None. Arguments validated by the caller
    (linear_distill_divergence)."""
    return ChunkedDistill.apply(hidden, weight, bias, valid, teacher, spec)
