"""The distillation divergence in plain PyTorch, ``chunk_size`` rows at a time: the "torch" backend
of linear_distill_divergence, and every backend's path for what the Triton kernels do not take
(fp32 heads by default, soft-capped logits, the top-K mode).

Forward makes a row chunk's logits of both heads [C, V], evaluates the per-token terms of
reference/distill.py on them and keeps two floats per row (divergence, student entropy). Backward
remakes each chunk, writes the gradient of the chunk's terms with respect to the student's logits
(by hand for the full divergence, by autograd over [C, V] for the top-K mode's) and feeds it to
the head's two matmuls: the extra memory is a few [C, V] buffers whatever N is, plus the fp32
gradient of the head (and, for a 16-bit head, its fp32 copy during each pass). The teacher's
logits are made under no_grad and nothing of the teacher is saved but its inputs.

Precision: the logits are projected in fp32 (a 16-bit head is not rounded to 16 bits first, as
TRL projects), and the terms and the logit gradient are evaluated in float64 on each chunk: in
fp32 each log-prob's rounding (|log p| x 6e-8, |log p| ~ 10-20 over a 32k vocabulary at
temperature 0.7) reached the gradient at 3e-5 of its largest entry for the reverse KL and 5e-4
for the JSD; in float64 they are within 1e-6 (tests/kernels/rl/test_distill_precision.py).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..reference.distill import full_terms, top_k_terms
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


def _scaled(pre, scale: float, softcap: Optional[float], temperature: float):
    """(z, slope): scaled logits from a head's raw output pre [C, V] (float64), and dz / dpre (a
    number, or [C, V] with a soft cap)."""
    z = pre * scale
    slope = scale / temperature
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
        slope = (1.0 - t * t).mul_(slope)
    return z / temperature, slope


def _student_logits(pre, spec: DistillSpec):
    return _scaled(pre, spec.student_logit_scale, spec.student_softcap, spec.temperature)


def in_compute_dtype(hidden, weight, bias):
    """(weight, bias) in hidden's compute dtype: a 16-bit head's fp32 copy, made once per pass
    (the logits are then projected in fp32, not rounded to 16 bits)."""
    cd = compute_dtype(hidden)
    return weight.to(cd), None if bias is None else bias.to(cd)


def _project(hidden, weight, bias, start, end):
    """The rows [start, end)'s raw logits [C, V] in float64 from a head already in the compute
    dtype (in_compute_dtype)."""
    return F.linear(hidden[start:end].to(weight.dtype), weight, bias).double()


def _teacher_logits(teacher, start, end, spec: DistillSpec):
    """The teacher's scaled logits [C, V] in float64; teacher's head in the compute dtype."""
    with torch.no_grad():
        return _scaled(_project(*teacher[:3], start, end), spec.teacher_logit_scale,
                       spec.teacher_softcap, spec.temperature)[0]


def _teacher_in_compute_dtype(teacher):
    """The teacher tuple with its head in the compute dtype (in_compute_dtype), for one pass."""
    if teacher[0] is None:
        return teacher
    return (teacher[0], *in_compute_dtype(*teacher[:3]), *teacher[3:])


def _full_logit_grad(zs, zt, beta: float):
    """d/dzs [C, V] of full_terms' divergence, written out (autograd's over [C, V] holds several
    times the buffers): the forward KL's p_s T - p_t (T: the teacher's mass where log p_s is
    finite, 1 without -inf logits), the reverse KL's p_s (log p_s - log p_t - KL), the JSD's
    (1 - beta) p_s (log p_s - log m - KL(p_s || m)) (its terms through m cancel but p_s's own)."""
    log_ps = torch.log_softmax(zs, dim=-1)
    log_pt = torch.log_softmax(zt.to(zs.dtype), dim=-1)
    p_s = log_ps.exp()
    if beta == 0.0:
        p_t = log_pt.exp_().mul_(torch.isfinite(log_ps))
        return p_s.mul_(p_t.sum(dim=-1, keepdim=True)).sub_(p_t)
    if beta == 1.0:
        gap = log_ps.sub_(log_pt)
    else:
        log_m = torch.logaddexp(log_ps + math.log(1.0 - beta), log_pt.add_(math.log(beta)))
        gap = log_ps.sub_(log_m)
    gap = torch.where(p_s > 0, gap, 0.0)
    grad = gap.sub_(torch.linalg.vecdot(p_s, gap)[:, None]).mul_(p_s)
    return grad if beta == 1.0 else grad.mul_(1.0 - beta)


def _chunk_terms(zs, teacher, start, end, spec: DistillSpec):
    """(divergence, entropy) [C] float64 of the rows [start, end): zs [C, V] the student's scaled
    logits in float64, teacher (hidden, weight, bias, labels, topk_ids, topk_logprobs)."""
    if spec.mode == "top_k":
        # (in float64, as every term here: in fp32, each tail's 1 - sum p cancels where the K
        # hold nearly all the mass, and the divergence missed its bar, 1e-5 of the largest, on a
        # third of random inputs, its gradient on 1%)
        topk_ids, topk_logprobs = teacher[4:]
        return top_k_terms(zs, topk_ids[start:end], topk_logprobs[start:end], spec.beta)
    return full_terms(zs, _teacher_logits(teacher, start, end, spec), spec.beta)


class ChunkedDistill(torch.autograd.Function):
    """(divergence [N], entropy [N]) of student hidden [N, Hs] through its head [V, Hs] (+ bias)
    against the teacher, 0 where valid [N] is False; differentiable w.r.t. the student only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, valid, teacher, spec: DistillSpec):
        cd = compute_dtype(hidden)
        n_rows = hidden.shape[0]
        divergence = hidden.new_zeros(n_rows, dtype=cd)
        entropy = hidden.new_zeros(n_rows, dtype=cd)
        head, pass_teacher = in_compute_dtype(hidden, weight, bias), _teacher_in_compute_dtype(
            teacher)
        for start, end in _chunks(n_rows, spec.chunk_size):
            zs, _ = _student_logits(_project(hidden, *head, start, end), spec)
            div, ent = _chunk_terms(zs, pass_teacher, start, end, spec)
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
        g_all = torch.where(valid, grad_divergence.double(), 0.0)
        head, teacher = in_compute_dtype(hidden, weight, bias), _teacher_in_compute_dtype(
            ctx.teacher)
        for start, end in _chunks(hidden.shape[0], spec.chunk_size):
            g = g_all[start:end]
            if spec.mode == "full":
                zs, slope = _student_logits(_project(hidden, *head, start, end), spec)  # [C, V]
                grad = _full_logit_grad(zs, _teacher_logits(teacher, start, end, spec),
                                        spec.beta).mul_(g[:, None]).mul_(slope)
            else:
                with torch.enable_grad():
                    pre = _project(hidden, *head, start, end).requires_grad_()
                    zs, _ = _student_logits(pre, spec)
                    div, _ = _chunk_terms(zs, teacher, start, end, spec)
                    (grad,) = torch.autograd.grad(div, pre, g)                      # [C, V]
            grads.add(grad.to(cd), hidden[start:end], start, end)
        return grads.result() + (None,) * 3


def chunked_distill(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    valid: torch.Tensor, teacher: tuple, spec: DistillSpec):
    """(divergence [N], entropy [N]) in the compute dtype (fp64 for fp64 inputs, else fp32), 0
    where valid is False: hidden [N, Hs], weight [V, Hs] of one dtype, valid [N] bool, teacher
    (hidden [N, Ht], weight [V, Ht], bias [V] or None, labels [N], topk_ids [N, K],
    topk_logprobs [N, K]), the ones the mode does not read None. Arguments validated by the caller
    (linear_distill_divergence)."""
    return ChunkedDistill.apply(hidden, weight, bias, valid, teacher, spec)
