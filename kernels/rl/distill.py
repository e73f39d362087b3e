"""The distillation divergence straight from two LM heads: a student's and a teacher's
next-token distributions compared at every valid position without either model's [N, V] logits,
the gradient to the student's hidden states and head only (TRL's definitions, reference/distill.py).

Backends (dispatch.backend_for; "auto" keeps CPU tensors on torch even under the Triton
interpreter, which takes minutes at an LM head's size): "triton" (and "cuda") run the fused
kernels of distill_kernels.py through distill_host.py for 16-bit heads, neither head's logits in
memory; the sampled mode is linear_token_logprobs of each head (its fused kernels there); the
"torch" backend, fp32 heads (`fuse_matmul`: Triton's fp32 dots have no tensor cores, cuBLAS's
GEMMs run them), soft-capped logits (the kernels have no tanh) and the top-K mode run
distill_torch.py's row chunks.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import torch

from .. import checks
from ..dispatch import backend_for, sync_checks_enabled, use_backend
from .distill_host import fused_distill
from .distill_torch import DistillSpec, chunked_distill
from .linear_logprobs import default_chunk_size as fused_chunk_size, linear_token_logprobs
from ..reference.distill import reduce_divergence

OP = "linear_distill_divergence"
MODES = ("full", "sampled", "top_k")
REDUCTIONS = ("mean", "sum", "none")
# Bytes of one [C, V] float64 buffer of the row-chunked path (its terms are evaluated in float64,
# distill_torch.py), which holds a few tens of them at its peak (the forward's terms of both
# heads' logits). Measured on the CPU at N=4096, H=256, V=32000, beta 0.5 (bench/bench_distill.py,
# a loaded 2-core machine), with fp32 terms then: 16 MiB peaked at 402 MiB above the inputs in
# 16 s, 8 MiB at 206 MiB in 27 s (each chunk streams both heads again). Float64 terms at 16 MiB
# (half the rows a chunk), temperature 0.7, 10% masked, a heavily loaded CPU: 329 MiB in 165 s,
# where fp32 terms took 310 MiB in 93 s.
CHUNK_BYTES = 1 << 24
TERM_BYTES = torch.float64.itemsize


class DistillOutput(NamedTuple):
    """linear_distill_divergence's result.

    divergence: by ``reduction``: a 0-dim mean or sum, or [...] per token (0 where masked);
        differentiable w.r.t. the student's hidden states, head and bias.
    entropy: [...] the student's entropy per token at the temperature (0 where masked), no grad.
    """
    divergence: torch.Tensor
    entropy: torch.Tensor


def default_chunk_size(n_rows: int, vocab_size: int, itemsize: int = TERM_BYTES) -> int:
    """Rows per chunk of the PyTorch path: CHUNK_BYTES of logits of ``itemsize`` bytes (float64
    terms by default), at least 16."""
    return max(1, min(max(n_rows, 1), max(16, CHUNK_BYTES // (max(vocab_size, 1) * itemsize))))


def _check_head(name: str, hidden, weight, bias, lead):
    """hidden [..., H] with leading shape ``lead`` (None: take it from hidden), weight [V, H],
    bias [V] or None, all floating point on one device."""
    checks.check_float(OP, f"{name}_hidden", hidden)
    checks.check_float(OP, f"{name}_weight", weight)
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{OP}: expected {name}_hidden [..., H] and {name}_weight [V, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if lead is not None and hidden.shape[:-1] != lead:
        raise ValueError(f"{OP}: {name}_hidden must have leading shape {tuple(lead)} (the "
                         f"student's), got {tuple(hidden.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"{OP}: {name}_weight is on {weight.device} but {name}_hidden is on "
                         f"{hidden.device}")
    if bias is not None:
        checks.check_float(OP, f"{name}_bias", bias)
        if bias.shape != (weight.shape[0],) or bias.device != weight.device:
            raise ValueError(f"{OP}: {name}_bias must be [{weight.shape[0]}] on {weight.device}, "
                             f"got {tuple(bias.shape)} on {bias.device}")


def _check_options(beta, temperature, reduction, num_items_in_batch, mode, scales, softcaps,
                   chunk_size):
    """The options; scales and softcaps (student's, teacher's)."""
    checks.check_unit_interval(OP, "beta", beta)
    checks.check_positive(OP, "temperature", temperature)
    checks.check_choice(OP, "reduction", reduction, REDUCTIONS)
    checks.check_choice(OP, "mode", mode, MODES)
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"{OP}: num_items_in_batch divides the sum of reduction='mean'; got it "
                         f"with reduction={reduction!r}")
    for side, scale, softcap in zip(("student", "teacher"), scales, softcaps):
        checks.check_positive(OP, f"{side}_logit_scale", scale)
        if softcap is not None:
            checks.check_positive(OP, f"{side}_softcap", softcap)
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"{OP}: chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_teacher(mode, student_hidden, student_weight, teacher_hidden, teacher_weight,
                   teacher_bias, labels, topk_ids, topk_logprobs):
    """The teacher's inputs the mode reads, and none it does not."""
    lead, vocab = student_hidden.shape[:-1], student_weight.shape[0]
    if mode == "top_k":
        if teacher_hidden is not None or teacher_weight is not None:
            raise ValueError(f"{OP}: mode='top_k' takes the teacher as teacher_topk_ids and "
                             f"teacher_topk_logprobs, not teacher_hidden / teacher_weight")
        checks.check_dtype(OP, "teacher_topk_ids", topk_ids, checks.INDEX_DTYPES)
        checks.check_float(OP, "teacher_topk_logprobs", topk_logprobs)
        if topk_ids.dim() != len(lead) + 1 or topk_ids.shape[:-1] != lead \
                or topk_ids.shape[-1] < 1 or topk_ids.shape[-1] >= vocab:
            raise ValueError(f"{OP}: teacher_topk_ids must be [{', '.join(map(str, lead))}"
                             f"{', ' if lead else ''}K] with 1 <= K < V={vocab}, got "
                             f"{tuple(topk_ids.shape)}")
        checks.check_same_shape(OP, "teacher_topk_logprobs", topk_logprobs, "teacher_topk_ids",
                                topk_ids)
        if topk_ids.device != student_hidden.device:
            raise ValueError(f"{OP}: teacher_topk_ids is on {topk_ids.device} but student_hidden "
                             f"is on {student_hidden.device}")
        return
    if topk_ids is not None or topk_logprobs is not None:
        raise ValueError(f"{OP}: teacher_topk_ids / teacher_topk_logprobs are read by "
                         f"mode='top_k' only, got them with mode={mode!r}")
    checks.check_tensor(OP, "teacher_hidden", teacher_hidden)
    checks.check_tensor(OP, "teacher_weight", teacher_weight)
    _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, lead)
    if teacher_weight.shape[0] != vocab:
        raise ValueError(f"{OP}: the heads' vocabularies differ: student_weight "
                         f"{tuple(student_weight.shape)}, teacher_weight "
                         f"{tuple(teacher_weight.shape)}")
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"{OP}: teacher_hidden is on {teacher_hidden.device} but student_hidden "
                         f"is on {student_hidden.device}")
    if mode == "sampled":
        checks.check_dtype(OP, "labels", labels, checks.INDEX_DTYPES)
        checks.check_same_shape(OP, "labels", labels, "student_hidden's leading shape",
                                student_hidden[..., 0])
    elif labels is not None:
        raise ValueError(f"{OP}: labels are read by mode='sampled' only, got them with "
                         f"mode={mode!r}")


def _head(hidden, weight, bias):
    """hidden as [N, H], weight and bias, in the wider of hidden's and weight's dtypes."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return (hidden.to(dtype).reshape(-1, weight.shape[1]), weight.to(dtype),
            None if bias is None else bias.to(dtype))


def _teacher_inputs(mode, valid, vocab, hidden, weight, bias, labels, topk_ids, topk_logprobs):
    """(hidden [N, Ht], weight, bias, labels [N], topk_ids [N, K], topk_logprobs [N, K]) as the
    paths take them, None where the mode reads nothing. What a masked row holds is never read
    (a pad label -100, padding ids -1, NaN log-probs): harmless stand-ins replace it."""
    if mode == "top_k":
        k = topk_ids.shape[-1]
        # K distinct ids with the uniform mass over K + 1 buckets
        ids = torch.where(valid[:, None], topk_ids.reshape(-1, k),
                          torch.arange(k, device=valid.device))
        logprobs = torch.where(valid[:, None], topk_logprobs.reshape(-1, k), -math.log(k + 1))
        if sync_checks_enabled(ids) and bool(((ids < 0) | (ids >= vocab)).any()):
            raise ValueError(f"{OP}: teacher_topk_ids must be in [0, {vocab}) on the valid rows")
        return None, None, None, None, ids, logprobs
    if labels is not None:
        labels = torch.where(valid, labels.reshape(-1), 0)
        if sync_checks_enabled(labels):
            checks.check_label_range(OP, labels, vocab, ignore_index=0)
    return (*_head(hidden, weight, bias), labels, None, None)


def _sixteen_bit(*tensors) -> bool:
    """Whether every head's input and weight is bf16 or fp16: what the fused kernels' dots take on
    the tensor cores (fuse_matmul's default)."""
    return all(t.dtype in (torch.bfloat16, torch.float16) for t in tensors)


def _sampled(hidden, weight, bias, teacher, valid, backend, temperature, scales, softcaps):
    """(log p_s(y) - log p_t(y), the student's entropy) [N], 0 on masked rows: linear_token_logprobs
    of each head on ``backend``'s path, the teacher's without a graph."""
    ht, wt, bt, labels = teacher[:4]
    labels = torch.where(valid, labels, -100)
    with use_backend("torch") if backend == "torch" else contextlib.nullcontext():
        logp_s, entropy = linear_token_logprobs(hidden, weight, labels, bias=bias,
                                                temperature=temperature, return_entropy=True,
                                                logit_scale=scales[0], softcap=softcaps[0])
        with torch.no_grad():
            logp_t = linear_token_logprobs(ht, wt, labels, bias=bt, temperature=temperature,
                                           logit_scale=scales[1], softcap=softcaps[1])
    return logp_s - logp_t.to(logp_s.dtype), entropy.detach()


def linear_distill_divergence(
        student_hidden: torch.Tensor, student_weight: torch.Tensor,
        teacher_hidden: Optional[torch.Tensor], teacher_weight: Optional[torch.Tensor],
        mask: Optional[torch.Tensor], beta: float = 1.0, temperature: float = 1.0, *,
        reduction: str = "mean", num_items_in_batch=None,
        student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
        student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
        student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
        mode: str = "full", labels: Optional[torch.Tensor] = None,
        teacher_topk_ids: Optional[torch.Tensor] = None,
        teacher_topk_logprobs: Optional[torch.Tensor] = None,
        chunk_size: Optional[int] = None, fuse_matmul: Optional[bool] = None) -> DistillOutput:
    """TRL's distillation divergence between a student's and a teacher's next-token
    distributions, from their hidden states and LM heads, without either [N, V] logits.

    Each head's logits z = cap * tanh(scale * (hidden @ weight.T + bias) / cap) / temperature
    (without a cap: scale * logits / temperature; Gemma-2's final_logit_softcapping as the cap,
    Cohere's logit_scale or Granite's 1 / logits_scaling as the scale), p = softmax(z). Per token:
      mode="full": beta=0 forward KL(p_t || p_s), beta=1 reverse KL(p_s || p_t), in between the
        generalized JSD beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = (1 - beta) p_s + beta p_t.
      mode="sampled": log p_s(y) - log p_t(y) at the sampled token y = labels, the reverse KL's
        one-sample estimate (its negative, detached, is the per-token advantage of on-policy
        distillation; times the importance ratio when off-policy). Gradient: d log p_s(y).
      mode="top_k": the full mode's divergence over K + 1 buckets: the teacher's top-K tokens
        (teacher_topk_ids, its log-probs teacher_topk_logprobs, at the temperature it was sampled
        with) and the rest, the student's probabilities gathered at those ids with their tail.

    Args:
        student_hidden: [..., Hs] fp32/bf16/fp16/fp64 ([N, Hs], or a host's [B, T, Hs]).
        student_weight: [V, Hs] head; student_bias: optional [V].
        teacher_hidden: [..., Ht] (the student's leading shape; Ht may differ from Hs);
            teacher_weight [V, Ht], teacher_bias optional [V]. None in mode="top_k". Never
            differentiated nor written.
        mask: [...] bool/int/float, nonzero = the token counts; None = every token.
        beta: in [0, 1]. temperature: > 0, on both heads.
        reduction: "mean" over the valid tokens (0 when none is; sum / num_items_in_batch when
            that is given, the gradient-accumulation rule of TRL and transformers), "sum", or
            "none" (per token [...]).
        labels: [...] int sampled tokens in [0, V), mode="sampled" only.
        teacher_topk_ids: [..., K] int distinct token ids, teacher_topk_logprobs [..., K] float,
            mode="top_k" only (1 <= K < V).
        chunk_size: rows per chunk of the PyTorch path (default: CHUNK_BYTES of logits); on the
            fused path, the backward's vocabulary chunk holds chunk_size x V logits (default:
            linear_logprobs' budget).
        fuse_matmul: the fused Triton kernels (both heads' logits made inside Triton GEMMs,
            mode="full" without caps, off the torch backend) or the row chunks' cuBLAS matmuls.
            None: fused when both heads' inputs and weights are 16-bit; fp32 GEMMs in Triton have
            no tensor cores (an H200 took 771 ms in them at N 4,096, V 151,936, where TRL's
            cuBLAS chunks took 224: bench/results/2026-11-28-h200), as linear_token_logprobs'
            fuse_matmul has it.
    Returns:
        DistillOutput(divergence, entropy) in fp32 (fp64 for fp64 inputs).
    """
    scales, softcaps = (student_logit_scale, teacher_logit_scale), (student_softcap,
                                                                    teacher_softcap)
    checks.check_tensor(OP, "student_hidden", student_hidden)
    checks.check_tensor(OP, "student_weight", student_weight)
    _check_head("student", student_hidden, student_weight, student_bias, None)
    _check_options(beta, temperature, reduction, num_items_in_batch, mode, scales, softcaps,
                   chunk_size)
    if fuse_matmul is not None and not isinstance(fuse_matmul, bool):
        raise TypeError(f"{OP}: fuse_matmul must be a bool or None, got {fuse_matmul!r}")
    _check_teacher(mode, student_hidden, student_weight, teacher_hidden, teacher_weight,
                   teacher_bias, labels, teacher_topk_ids, teacher_topk_logprobs)
    lead = student_hidden.shape[:-1]
    valid = checks.mask_arg(OP, mask, "student_hidden's leading shape", student_hidden[..., 0])
    valid = (torch.ones(lead, dtype=torch.bool, device=student_hidden.device) if valid is None
             else valid != 0).reshape(-1)
    hidden, weight, bias = _head(student_hidden, student_weight, student_bias)
    teacher = _teacher_inputs(mode, valid, weight.shape[0], teacher_hidden, teacher_weight,
                              teacher_bias, labels, teacher_topk_ids, teacher_topk_logprobs)
    backend = backend_for(hidden, interpret_on_auto=False)
    if mode == "sampled":
        divergence, entropy = _sampled(hidden, weight, bias, teacher, valid, backend, temperature,
                                       scales, softcaps)
    elif (backend != "torch" and mode == "full" and softcaps == (None, None)
          and (_sixteen_bit(hidden, weight, *teacher[:2]) if fuse_matmul is None
               else fuse_matmul)):
        divergence, entropy = fused_distill(
            hidden, weight, bias, *teacher[:3], valid, beta, scales[0] / temperature,
            scales[1] / temperature,
            chunk_size or fused_chunk_size(hidden.shape[0], weight.shape[0], hidden.itemsize))
    else:
        spec = DistillSpec(mode, float(beta), float(temperature), *map(float, scales), *softcaps,
                           chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0]))
        divergence, entropy = chunked_distill(hidden, weight, bias, valid, teacher, spec)
    divergence = reduce_divergence(divergence.reshape(lead), valid.reshape(lead), reduction,
                                   num_items_in_batch)
    return DistillOutput(divergence, entropy.reshape(lead))
