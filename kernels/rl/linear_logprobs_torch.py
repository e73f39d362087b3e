"""The LM head's log-probs in plain PyTorch, ``chunk_size`` rows at a time: the "torch" backend of
linear_token_logprobs, and every backend's path for soft-capped logits (the Triton kernels have no
tanh).

Forward makes a chunk's logits [C, V], transforms them (logit_scale, soft-capping, temperature),
keeps three floats per row (logp, entropy, logsumexp) and drops the chunk. Backward remakes each
chunk and writes its gradient by hand, with no autograd graph over the logits: the extra memory is
a few [C, V] buffers whatever N is, plus the fp32 gradient of the head.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .statistics import compute_dtype


def transformed_logits(hidden, weight, bias, logit_scale, softcap, temperature):
    """(z, t): z = cap * tanh(s * (hidden @ weight.T + bias) / cap) / temperature [C, V] in the
    compute dtype (without softcap: s * logits / temperature), and t = tanh(.) (None without
    softcap) for the backward's chain rule."""
    z = F.linear(hidden, weight, bias).to(compute_dtype(hidden))
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    t = None
    if softcap is not None:
        t = z.div_(softcap).tanh_()
        z = t * softcap
    return z.div_(temperature), t


# log p below this has p == 0 in every float dtype (exp underflows near -745 in fp64): clamping
# there changes no p, and keeps p * log p and its gradient at 0 for a -inf logit instead of NaN.
LOG_P_FLOOR = -1e4


def log_probs_(z, lse):
    """log p [C, V] of scaled logits z and their row logsumexp lse [C], in z's buffer, clamped at
    LOG_P_FLOOR."""
    return z.sub_(lse[:, None]).clamp_(min=LOG_P_FLOOR)


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def chunk_logprobs_(z, labels, valid, return_entropy: bool):
    """(logp [C], lse [C], entropy [C] or None, log p [C, V]) of scaled logits z [C, V] (compute
    dtype): logp 0 on the rows ``valid`` [C] leaves out. With ``return_entropy`` z's buffer becomes
    log p (log_probs_); without, log p is None and z is left as it was."""
    lse = torch.logsumexp(z, dim=-1)
    index = torch.where(valid, labels, 0).long()[:, None]
    logp = torch.where(valid, z.gather(1, index).squeeze(1) - lse, 0.0)
    if not return_entropy:
        return logp, lse, None, None
    log_p = log_probs_(z, lse)                                         # z's buffer from here
    # entropy = -sum p log p, a row dot product: no third [C, V] buffer
    entropy = torch.where(valid, -torch.linalg.vecdot(log_p.exp(), log_p), 0.0)
    return logp, lse, entropy, log_p


def logit_grad_(log_p, t, g_logp, g_entropy, entropy, labels, valid, temperature: float,
                logit_scale: float):
    """d loss / d (raw logits) [C, V], made in log_p's buffer (log p [C, V], log_probs_), of
    upstream gradients g_logp [C] and g_entropy [C] (or None) in the compute dtype; t: the soft
    cap's tanh (transformed_logits), or None."""
    p = log_p.exp()
    g_logp = g_logp[:, None]
    # d logp / d z = onehot(label) - p;  d entropy / d z = -p * (log p + entropy), so
    # d loss / d z = onehot * g_logp - p * (g_logp + g_entropy * (log p + entropy)),
    # made in log_p's buffer.
    grad = log_p
    if g_entropy is not None:
        grad.add_(entropy[:, None]).mul_(g_entropy[:, None])
        grad.add_(g_logp)
    else:
        grad.copy_(g_logp.expand_as(grad))
    grad.mul_(p).neg_()
    del p
    index = torch.where(valid, labels, 0).long()[:, None]
    grad.scatter_add_(1, index, g_logp)
    grad.masked_fill_(~valid[:, None], 0.0).div_(temperature)
    if t is not None:
        grad.mul_(1.0 - t * t)
    if logit_scale != 1.0:
        grad.mul_(logit_scale)
    return grad


class HeadGrads:
    """The gradients of a head's inputs (hidden [N, H], weight [V, H], bias [V]) that a row-chunked
    backward accumulates, one chunk's logit gradient at a time; None where ``needed`` (hidden,
    weight, bias) says no. The head's gradient accumulates in the compute dtype."""

    def __init__(self, hidden, weight, needed):
        cd = compute_dtype(hidden)
        self.hidden, self.weight = hidden, weight
        self.grad_hidden = torch.zeros_like(hidden) if needed[0] else None
        self.grad_weight = (torch.zeros(weight.shape, dtype=cd, device=weight.device)
                            if needed[1] else None)
        self.grad_bias = (torch.zeros(weight.shape[0], dtype=cd, device=weight.device)
                          if needed[2] else None)

    def add(self, grad, h, start, end):
        """The rows [start, end)'s logit gradient grad [C, V] (compute dtype); h their hidden."""
        if self.grad_hidden is not None:
            self.grad_hidden[start:end] = (grad.to(self.weight.dtype) @ self.weight).to(h.dtype)
        if self.grad_weight is not None:
            self.grad_weight.addmm_(grad.t(), h.to(grad.dtype))
        if self.grad_bias is not None:
            self.grad_bias += grad.sum(dim=0)

    def result(self):
        """(d hidden, d weight, d bias), each in its input's dtype or None."""
        dtype = self.weight.dtype
        return (self.grad_hidden, None if self.grad_weight is None else self.grad_weight.to(dtype),
                None if self.grad_bias is None else self.grad_bias.to(dtype))


class ChunkedHead(torch.autograd.Function):
    """(logp [N], entropy [N] or [0], lse [N]) of hidden [N, H] through weight [V, H] (+ bias)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, return_entropy,
                chunk_size, logit_scale, softcap):
        cd = compute_dtype(hidden)
        n_rows = hidden.shape[0]
        logp = hidden.new_zeros(n_rows, dtype=cd)
        lse = hidden.new_zeros(n_rows, dtype=cd)
        entropy = hidden.new_zeros(n_rows if return_entropy else 0, dtype=cd)
        valid = labels != ignore_index
        for start, end in _chunks(n_rows, chunk_size):
            z, _ = transformed_logits(hidden[start:end], weight, bias, logit_scale, softcap,
                                      temperature)
            rows = chunk_logprobs_(z, labels[start:end], valid[start:end], return_entropy)
            logp[start:end], lse[start:end] = rows[0], rows[1]
            if return_entropy:
                entropy[start:end] = rows[2]
            del z, rows  # before the next chunk's logits are made
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.args = (temperature, ignore_index, chunk_size, logit_scale, softcap)
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, chunk_size, logit_scale, softcap = ctx.args
        cd = lse.dtype
        grads = HeadGrads(hidden, weight, ctx.needs_input_grad[:3])
        has_entropy_grad = entropy.numel() > 0
        valid = labels != ignore_index
        for start, end in _chunks(hidden.shape[0], chunk_size):
            h = hidden[start:end]
            z, t = transformed_logits(h, weight, bias, logit_scale, softcap, temperature)
            log_p = log_probs_(z, lse[start:end])                      # z's buffer from here
            grad = logit_grad_(log_p, t, grad_logp[start:end].to(cd),
                               grad_entropy[start:end].to(cd) if has_entropy_grad else None,
                               entropy[start:end], labels[start:end], valid[start:end],
                               temperature, logit_scale)
            grads.add(grad, h, start, end)
            del z, t, log_p, grad  # before the next chunk's logits are made
        return grads.result() + (None,) * 7


def chunked_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor], labels: torch.Tensor, *,
                            temperature: float, ignore_index: int, return_entropy: bool,
                            chunk_size: int, logit_scale: float = 1.0,
                            softcap: Optional[float] = None):
    """(logp [N], entropy [N] or [0]) in the compute dtype (fp64 for fp64 inputs, else fp32):
    hidden [N, H], weight [V, H] of one dtype, labels [N]; differentiable w.r.t. hidden, weight and
    bias. Arguments validated by the caller (linear_token_logprobs)."""
    logp, entropy, _ = ChunkedHead.apply(hidden, weight, bias, labels, float(temperature),
                                         ignore_index, bool(return_entropy), int(chunk_size),
                                         float(logit_scale), softcap)
    return logp, entropy
