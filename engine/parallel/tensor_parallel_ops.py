"""The collectives of a tensor-parallel forward, differentiable, and the vocabulary-parallel log-prob.

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


def vocab_parallel_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                            group, temperature: float = 1.0, with_entropy: bool = False):
    """hidden [M, H] (replicated), weight [V_r, H] (this rank's vocabulary rows from vocab_start),
    labels [M] (global ids) -> fp32 log p(label) [M] under softmax(logits / temperature), and
    with_entropy: (log-probs, entropy [M]). Each rank's log-sum-exp partial (its max and its sum of
    exponentials) is combined over the group, as the split kernel combines vocabulary splits."""
    logits = torch.nn.functional.linear(to_ranks(hidden, group), weight).float() / temperature  # [M, V_r]
    with torch.no_grad():  # a shift only: any constant gives the same log-sum-exp
        shift = logits.max(dim=-1).values
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    exp = torch.exp(logits - shift.unsqueeze(-1))
    total = from_ranks(exp.sum(dim=-1), group)  # [M]
    lse = shift + torch.log(total)
    local = labels - vocab_start
    mine = (local >= 0) & (local < weight.shape[0])
    picked = logits.gather(-1, torch.where(mine, local, 0).unsqueeze(-1)).squeeze(-1) * mine
    logp = from_ranks(picked, group) - lse
    if not with_entropy:
        return logp
    # H = lse - sum_v p_v z_v, the sum taken over every rank's slice.
    expected = from_ranks((exp * logits).sum(dim=-1), group) / total
    return logp, lse - expected
