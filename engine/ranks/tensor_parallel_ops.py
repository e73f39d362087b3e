"""The collectives of a tensor-parallel forward, differentiable, and the vocabulary-parallel
log-prob.

Every tensor rank of a group holds the same (replicated) hidden states and its slice of each weight.
Two conjugate operators carry activations across the slices (Megatron's f and g):
- `to_ranks(x)`: the input of a column-parallel GEMM: identity forward; backward sums the input
  gradients of every rank's slice (each slice contributes a part of dL/dx).
- `from_ranks(x)`: the output of a row-parallel GEMM (and of the vocabulary-parallel embedding):
  the partial sums all-reduced forward; backward identity (every rank's loss is the same function
  of the replicated output, so its gradient is already whole on every rank).
Without autograd (generation) both are the plain collective, in place.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class _ToRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _FromRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def to_ranks(x: torch.Tensor, group) -> torch.Tensor:
    """x [..., C] replicated -> the same values, its gradient summed over the group's ranks."""
    return _ToRanks.apply(x, group) if torch.is_grad_enabled() and x.requires_grad else x


def from_ranks(x: torch.Tensor, group) -> torch.Tensor:
    """x [..., C] partial sums -> their sum over the group's ranks (in place without autograd)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FromRanks.apply(x, group)
    dist.all_reduce(x, group=group)
    return x


# Vocabulary rows per chunk of the vocabulary-parallel log-prob: a chunk's fp32 [M, rows] logits
# (and their exponentials) stay under 64 MiB, whatever M and the slice's size.
CHUNK_BYTES = 1 << 26


def _chunks(rows: int, vocab: int) -> tuple[range, int]:
    """(the chunks' first rows, rows per chunk) of a [vocab, H] slice for `rows` hidden rows."""
    step = max(1, min(vocab, CHUNK_BYTES // (4 * max(rows, 1))))
    return range(0, vocab, step), step


def _chunk_logits(hidden, weight, bias, start: int, step: int, temperature: float):
    """fp32 logits [M, C] of the slice's vocabulary rows start:start+step, bias [V_r] (fp32, -inf
    at masked ids) or None added before the temperature, as linear_token_logprobs adds it."""
    z = torch.nn.functional.linear(hidden, weight[start:start + step]).float()
    return (z if bias is None else z + bias[start:start + step]) / temperature


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """x with its -inf entries (a row whose logits so far are all masked) set to 0: a shift that
    keeps exp(z - shift) at 0, never nan, for masked z."""
    return torch.where(torch.isfinite(x), x, 0.0)


class _VocabParallelLogprobs(torch.autograd.Function):
    """log p(label) (and entropy) over a vocabulary split across the group, chunk by chunk: the
    forward keeps per row an online max, sum of exponentials (and of exponentials x logits) and the
    label's logit, combined over the ranks at the end; the backward recomputes each chunk's logits
    from hidden and weight. Kept for the backward: the inputs and 2 floats a row (lse, and the
    expected logit for the entropy), never a [M, V_r] tensor. A logit at -inf (the bias's masked
    ids) takes probability 0 and adds nothing to the entropy or to any gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, vocab_start, group, temperature, with_entropy):
        rows, vocab = hidden.shape[0], weight.shape[0]
        local = labels - vocab_start
        shift = torch.full((rows,), float("-inf"), device=hidden.device)
        # sum exp(z - shift), sum exp(z - shift) z, label's z
        sums = torch.zeros(3, rows, device=hidden.device)
        starts, step = _chunks(rows, vocab)
        for start in starts:
            z = _chunk_logits(hidden, weight, bias, start, step, temperature)  # [M, C]
            new_shift = torch.maximum(shift, z.max(dim=-1).values)
            exp = torch.exp(z - _finite_or_zero(new_shift).unsqueeze(-1))
            rescale = torch.exp(shift - _finite_or_zero(new_shift))
            sums[0] = sums[0] * rescale + exp.sum(dim=-1)
            if with_entropy:
                sums[1] = sums[1] * rescale + torch.where(exp > 0, exp * z, 0.0).sum(dim=-1)
            here = (local >= start) & (local < start + z.shape[1])
            column = torch.where(here, local - start, 0).unsqueeze(-1)
            sums[2] += torch.where(here, z.gather(-1, column).squeeze(-1), 0.0)
            shift = new_shift
        top = shift.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        sums[:2] *= torch.exp(shift - top)  # 0 on a rank whose logits are all masked
        dist.all_reduce(sums, group=group)  # one collective for the three sums
        lse = top + torch.log(sums[0])
        expected = sums[1] / sums[0]  # sum_v p_v z_v
        ctx.save_for_backward(hidden, weight, labels, bias, lse, expected)
        ctx.vocab_start, ctx.group = vocab_start, group
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        logp = sums[2] - lse
        return (logp, lse - expected) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, labels, bias, lse, expected = ctx.saved_tensors
        rows, vocab = hidden.shape[0], weight.shape[0]
        local = labels - ctx.vocab_start
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        starts, step = _chunks(rows, vocab)
        for start in starts:
            w = weight[start:start + step]
            # [M, C] again
            z = _chunk_logits(hidden, weight, bias, start, step, ctx.temperature)
            p = torch.exp(z - lse.unsqueeze(-1))
            # d logp / dz = onehot(label) - p; d entropy / dz = -p (z - E)
            grad_z = -p * grad_logp.unsqueeze(-1)
            if ctx.with_entropy and grad_entropy is not None:
                grad_z -= torch.where(p > 0, p * (z - expected.unsqueeze(-1)), 0.0) * \
                    grad_entropy.unsqueeze(-1)
            here = (local >= start) & (local < start + z.shape[1])
            grad_z.scatter_add_(-1, torch.where(here, local - start, 0).unsqueeze(-1),
                                (grad_logp * here).unsqueeze(-1))
            grad_logits = (grad_z / ctx.temperature).to(weight.dtype)
            grad_hidden += (grad_logits @ w).float()
            if grad_weight is not None:
                grad_weight[start:start + step] = grad_logits.T @ hidden
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None, None, None, None, None, None
        # each rank's slice gives a part (to_ranks' backward)
        dist.all_reduce(grad_hidden, group=ctx.group)
        return grad_hidden.to(hidden.dtype), grad_weight, None, None, None, None, None, None


def vocab_parallel_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            vocab_start: int, group, temperature: float = 1.0,
                            with_entropy: bool = False, bias: torch.Tensor | None = None):
    """hidden [M, H] (replicated), weight [V_r, H] (this rank's vocabulary rows from vocab_start),
    labels [M] (global ids) -> fp32 log p(label) [M] under softmax(logits / temperature), and
    with_entropy: (log-probs, entropy [M]). Each rank's log-sum-exp partial (its max and its sum of
    exponentials) is combined over the group, as the split kernel combines vocabulary splits; the
    logits are made and used chunk by chunk, forward and backward (_VocabParallelLogprobs).
    bias [V] (the whole vocabulary's, fp32; a vision-language model's -inf at its vision ids) is
    added to the logits, each rank reading its rows (not trained)."""
    if bias is not None:
        bias = bias.detach().float()[vocab_start:vocab_start + weight.shape[0]]
    args = (hidden, weight, labels, bias, vocab_start, group, temperature, with_entropy)
    return _VocabParallelLogprobs.apply(*args)
