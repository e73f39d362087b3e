"""A loss of the LM head's token log-probs with its gradient taken in the forward: each row chunk's
logits are made once, turned into log-probs, handed to the caller's loss, and, while they are still
in memory, into the logits' gradient and the head's two gradient matmuls. The backward only scales
the saved gradients by the upstream one (a scalar).

Why: linear_token_logprobs holds no logits between forward and backward, so its backward makes
them again: a fourth [N, H] x [H, V] matmul beside the three no implementation avoids (logits,
d hidden, d weight). In fp32, where cuBLAS multiplies without tensor cores, that matmul is a
quarter of the op's time (an H200, GRPO loss at Liger's shape, bench/results/2026-11-28-h200: ours
370 ms with the recompute, eager PyTorch's three matmuls 255 ms). Liger's chunked losses take
their gradients in the forward for the same reason.

The condition: the loss must be a sum over row chunks of terms each chunk's own log-probs decide
(`row_loss(logp, start, end)` sees only rows [start, end)); a host's normalizers over the whole
batch are constants it computes beforehand. A GRPO loss is such a sum over whole sequences (its
sequence-level ratio couples the tokens of one sequence only), so chunks are whole sequences.

Math in the compute dtype (fp32, fp64 for fp64 inputs) on every backend: linear_logprobs_torch's
chunk helpers, the same as its row-chunked path. A few passes over each [C, V] chunk beside its
GEMMs: this path is for heads whose GEMMs are cuBLAS's in fp32/fp64; 16-bit heads keep the fused
Triton kernels (linear_token_logprobs).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

from .linear_logprobs import CHUNK_BYTES, check_head_inputs
from .linear_logprobs_torch import (HeadGrads, chunk_logprobs_, log_probs_, logit_grad_,
                                    transformed_logits)
from .statistics import compute_dtype

# A row chunk of whole sequences: as many as linear_logprobs' CHUNK_BYTES of logits hold (in the
# compute dtype), at least one, so memory does not grow with the batch; one sequence whose logits
# pass MAX_CHUNK_BYTES is not taken (a caller recomputes instead). A 512-token sequence at Liger's
# V 128,256 in fp32 is 250 MiB: one a chunk. The chunk's peak is about two such buffers (log p
# and p in the gradient; a soft cap's tanh a third, a 16-bit head's logits before their fp32
# copy another), beside the head's gradient.
MAX_CHUNK_BYTES = 1 << 28
# What a row chunk's loss gets: its log-probs [C] (a leaf that requires grad, compute dtype) and
# its rows' bounds in the batch -> its share of the loss (a 0-dim tensor).
RowLoss = Callable[[torch.Tensor, int, int], torch.Tensor]


class _LossInForward(torch.autograd.Function):
    """(loss [], logp [N], entropy [N] or [0]) of hidden [N, H] through weight [V, H] (+ bias);
    only the loss is differentiable, by hidden, weight and bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, row_loss, bounds, temperature, ignore_index,
                return_entropy, logit_scale, softcap):
        cd = compute_dtype(hidden)
        n_rows = hidden.shape[0]
        logp = hidden.new_zeros(n_rows, dtype=cd)
        entropy = hidden.new_zeros(n_rows if return_entropy else 0, dtype=cd)
        total = hidden.new_zeros((), dtype=cd)
        grads = HeadGrads(hidden, weight, (hidden.requires_grad, weight.requires_grad,
                                           bias is not None and bias.requires_grad))
        loss_dtype = cd  # the row losses' own (the first chunk's), in which the sum comes back
        valid = labels != ignore_index
        for number, (start, end) in enumerate(bounds):
            h, ok, ids = hidden[start:end], valid[start:end], labels[start:end]
            z, t = transformed_logits(h, weight, bias, logit_scale, softcap, temperature)
            # log p in z's buffer either way: the entropy wants it, so does the gradient
            chunk, lse, chunk_entropy, _ = chunk_logprobs_(z, ids, ok, return_entropy)
            log_p = z if return_entropy else log_probs_(z, lse)
            logp[start:end] = chunk
            if return_entropy:
                entropy[start:end] = chunk_entropy
            with torch.enable_grad():
                leaf = chunk.detach().requires_grad_()
                loss = row_loss(leaf, start, end)
                g_logp = (torch.autograd.grad(loss, leaf, allow_unused=True)[0]
                          if loss.requires_grad else None)
            loss_dtype = loss.dtype if number == 0 else loss_dtype
            total += loss.detach().to(cd)
            g_logp = torch.zeros_like(chunk) if g_logp is None else g_logp.to(cd)
            grad = logit_grad_(log_p, t, g_logp, None, None, ids, ok, temperature, logit_scale)
            grads.add(grad, h, start, end)
            # the chunk's [C, V] buffers go before the next chunk's logits are made
            del z, t, log_p, grad
        made = grads.result()
        ctx.made, ctx.spent = tuple(g is not None for g in made), False
        ctx.save_for_backward(*(g for g in made if g is not None))
        ctx.mark_non_differentiable(logp, entropy)
        return total.to(loss_dtype), logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        # Scaled in place: a copy would hold the head's gradient twice (2 GiB each in fp32 at
        # Liger's shape). So they are handed out once.
        if ctx.spent:
            raise RuntimeError("linear_logprobs_loss: backward ran a second time (retain_graph); "
                               "its gradients were made in the forward and are handed out once")
        ctx.spent = True
        saved = iter(ctx.saved_tensors)
        scaled = tuple(next(saved).mul_(grad_loss) if made else None for made in ctx.made)
        return scaled + (None,) * 8


def sequences_per_chunk(steps: int, vocab: int, itemsize: int) -> Optional[int]:
    """Sequences of ``steps`` rows per row chunk at a vocabulary of ``vocab`` logits of
    ``itemsize`` bytes (the rule above), or None where one sequence's pass MAX_CHUNK_BYTES."""
    sequence = steps * vocab * itemsize
    return None if sequence > MAX_CHUNK_BYTES else max(1, CHUNK_BYTES // max(sequence, 1))


def linear_logprobs_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         row_loss: RowLoss, bounds: list[tuple[int, int]], *,
                         bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                         ignore_index: int = -100, return_entropy: bool = False,
                         logit_scale: float = 1.0, softcap: Optional[float] = None):
    """(loss [], logp [N], entropy [N] or [0]): loss = sum over the row chunks ``bounds`` (each
    (start, end), together every row once, in order) of row_loss(logp[start:end], start, end),
    where logp are linear_token_logprobs' of hidden [N, H] through weight [V, H] (+ bias [V]),
    labels [N] (ignore_index: logp 0, no gradient), at temperature, logit_scale and softcap as
    there. logp and entropy come detached, in the compute dtype; the loss is differentiable by
    hidden, weight and bias, its gradients made here in the forward (see the module docstring)
    and scaled in place by the backward, which runs once (retain_graph is refused).
    hidden and weight (and bias) of one dtype. Under an autocast the head's matmuls would follow
    it: a caller that wants the head's own dtype turns it off."""
    check_head_inputs(hidden, weight, bias, labels, temperature, ignore_index, logit_scale,
                      softcap)
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if hidden.dim() != 2 or len(dtypes) != 1:
        raise ValueError(f"linear_logprobs_loss: expected hidden [N, H] and a head of its dtype, "
                         f"got hidden {tuple(hidden.shape)} {hidden.dtype}, weight {weight.dtype}"
                         f"{'' if bias is None else f', bias {bias.dtype}'}")
    covered = [end - start for start, end in bounds]
    if sum(covered) != hidden.shape[0] or any(n < 0 for n in covered) or any(
            a[1] != b[0] for a, b in zip(bounds, bounds[1:])) or (bounds and bounds[0][0] != 0):
        raise ValueError(f"linear_logprobs_loss: bounds {bounds} must cover the {hidden.shape[0]} "
                         "rows in order, each once")
    return _LossInForward.apply(hidden, weight, bias, labels, row_loss, list(bounds),
                                float(temperature), int(ignore_index), bool(return_entropy),
                                float(logit_scale), softcap)
