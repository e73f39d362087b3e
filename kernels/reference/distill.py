"""Plain PyTorch reference of the distillation divergence (TRL's definitions), re-exported as
``fusedrl.kernels.reference.linear_distill_divergence``: the oracle of the fused op, in float64
for float64 inputs.

On scaled logits zs (student) and zt (teacher), log p = log_softmax(z):
  beta = 0      forward KL(teacher || student)  = sum p_t (log p_t - log p_s)
  beta = 1      reverse KL(student || teacher)  = sum p_s (log p_s - log p_t)
  0 < beta < 1  generalized JSD = beta KL(p_t || m) + (1 - beta) KL(p_s || m),
                m = (1 - beta) p_s + beta p_t
The same divergence over K + 1 buckets (the teacher's top K tokens and the rest) is the top-K
mode's, and log p_s(y) - log p_t(y) at the sampled token y the sampled mode's.

The per-token term functions here are also the PyTorch backend's (rl/distill_torch.py evaluates
them on row chunks of the logits); the reference below makes the whole [N, V] logits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .statistics import compute_dtype

def scaled_logits(hidden, weight, bias, logit_scale, softcap, temperature):
    """z = cap * tanh(s * (hidden @ weight.T + bias) / cap) / temperature [..., V] in the compute
    dtype (without a cap: s * logits / temperature)."""
    z = F.linear(hidden, weight, bias).to(compute_dtype(hidden)) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _finite_where_empty(log_p, p):
    """log_p with -inf replaced by 0 where p is 0: such a term is 0 (its limit), and 0 * inf would
    make it, and its gradient, NaN. Finite log-probs pass unchanged (however small)."""
    return log_p.masked_fill(torch.isneginf(log_p) & (p == 0), 0.0)


def _kl_terms(log_p, log_q):
    """sum p (log p - log q) over the last dim; 0 for the terms where p is 0."""
    p = log_p.exp()
    return (p * (_finite_where_empty(log_p, p) - _finite_where_empty(log_q, p))).sum(dim=-1)


def bucket_divergence(log_ps, log_pt, beta: float):
    """TRL's divergence between two distributions given as log-probs [..., B] over the same B
    buckets (a vocabulary, or top-K tokens and a tail) -> [...]."""
    if beta == 0.0:
        return _kl_terms(log_pt, log_ps)
    if beta == 1.0:
        return _kl_terms(log_ps, log_pt)
    log_m = torch.logaddexp(log_ps + math.log(1.0 - beta), log_pt + math.log(beta))
    return beta * _kl_terms(log_pt, log_m) + (1.0 - beta) * _kl_terms(log_ps, log_m)


def entropy_of(log_p):
    """-sum p log p over the last dim of log-probs [..., V] -> [...]."""
    p = log_p.exp()
    return -(p * _finite_where_empty(log_p, p)).sum(dim=-1)


def with_tail(log_p):
    """Log-probs [..., K] of K distinct tokens, with the log of the rest's mass appended as a
    (K + 1)-th bucket: log(1 - sum p), clamped where the K hold (nearly) all of it."""
    total = torch.logsumexp(log_p, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([log_p, torch.log(-torch.expm1(total))], dim=-1)


def full_terms(zs, zt, beta: float):
    """(divergence, student entropy) [...] of scaled logits zs, zt [..., V]."""
    log_ps = torch.log_softmax(zs, dim=-1)
    log_pt = torch.log_softmax(zt.to(zs.dtype), dim=-1)
    return bucket_divergence(log_ps, log_pt, beta), entropy_of(log_ps)


def top_k_terms(zs, topk_ids, topk_logprobs, beta: float):
    """(divergence, student entropy) [...] of the student's scaled logits zs [..., V] against a
    teacher known by its top-K token ids and log-probs [..., K], each side with its tail bucket."""
    log_ps = torch.log_softmax(zs, dim=-1)
    student = with_tail(log_ps.gather(-1, topk_ids.long()))
    teacher = with_tail(topk_logprobs.to(zs.dtype))
    return bucket_divergence(student, teacher, beta), entropy_of(log_ps)


def sampled_terms(zs, zt, labels):
    """(log p_s(y) - log p_t(y), student entropy) [...] at the sampled tokens labels [...]."""
    log_ps = torch.log_softmax(zs, dim=-1)
    log_pt = torch.log_softmax(zt.to(zs.dtype), dim=-1)
    index = labels.long().unsqueeze(-1)
    gap = (log_ps.gather(-1, index) - log_pt.gather(-1, index)).squeeze(-1)
    return gap, entropy_of(log_ps)


def reduce_divergence(per_token, valid, reduction: str, num_items_in_batch=None):
    """The host's reduction of per-token values [...] (0 where not valid): "none" as they are,
    "sum", or "mean" over the valid tokens (0 when none is), or sum / num_items_in_batch when
    given (a gradient-accumulation-correct mean, TRL's and transformers' rule)."""
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, dtype=total.dtype,
                                       device=total.device)
    return total / valid.sum().clamp(min=1).to(total.dtype)


def linear_distill_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                              mask, *, beta=1.0, temperature=1.0, reduction="mean",
                              num_items_in_batch=None, student_bias=None, teacher_bias=None,
                              student_logit_scale=1.0, teacher_logit_scale=1.0,
                              student_softcap=None, teacher_softcap=None, mode="full",
                              labels=None, teacher_topk_ids=None, teacher_topk_logprobs=None):
    """(divergence, entropy) as the fused op returns them (its docstring has the arguments), from
    the whole [N, V] logits of each head, differentiated by autograd."""
    zs = scaled_logits(student_hidden, student_weight, student_bias, student_logit_scale,
                       student_softcap, temperature)
    if mode == "top_k":
        div, entropy = top_k_terms(zs, teacher_topk_ids, teacher_topk_logprobs, beta)
    else:
        with torch.no_grad():
            zt = scaled_logits(teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale,
                               teacher_softcap, temperature)
        div, entropy = (sampled_terms(zs, zt, labels) if mode == "sampled"
                        else full_terms(zs, zt, beta))
    valid = torch.ones(div.shape, dtype=torch.bool) if mask is None else mask != 0
    div = torch.where(valid.to(div.device), div, 0.0)
    entropy = torch.where(valid.to(div.device), entropy, 0.0).detach()
    return reduce_divergence(div, valid, reduction, num_items_in_batch), entropy
