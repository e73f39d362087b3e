"""The training losses of the SFT and reward-model stages, as pure functions of tensors.

Each returns a *sum* over its units (tokens or examples); the trainer divides by the number of
units in the whole optimizer step, so gradient accumulation gives the same gradient as one big
batch (a mean of per-micro-batch means would weight short micro-batches up).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...kernels import linear_token_logprobs

from ..data.packing import IGNORE


def token_nll_sum(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-sum of log p(label) over labelled rows; hidden [N, H], weight [V, H], labels [N] -> scalar fp32.

    Only labelled rows go through the LM head, and `linear_token_logprobs` never holds [N, V] logits.
    Under autocast the head runs in the autocast dtype, as nn.Linear would, but with both operands
    cast here and autocast off inside: the op's backward recomputes the logits, and it must do so in
    the dtype its forward used (autocast is not active during backward).
    """
    device_type = hidden.device.type
    dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
             else lm_head_weight.dtype)
    rows = (labels != IGNORE).nonzero().squeeze(1)                 # [M]
    with torch.autocast(device_type, enabled=False):
        logp = linear_token_logprobs(hidden.index_select(0, rows).to(dtype), lm_head_weight.to(dtype),
                                     labels.index_select(0, rows))  # [M] fp32
    return -logp.sum()


def pair_indices(k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All K-choose-2 pairs (i, j), i < j, of a ranking ordered best first: i is preferred to j."""
    i, j = torch.triu_indices(k, k, offset=1, device=device)
    return i, j


def ranking_loss_sum(rewards: torch.Tensor, group_sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """InstructGPT's reward-model loss, one ranking per batch element.

    rewards [S] fp32: scores of the S = sum(group_sizes) sequences, each group best first.
    Element e with K responses contributes mean over its K(K-1)/2 pairs of -log sigmoid(r_i - r_j),
    so a K-way ranking weighs as much as a pair (the paper's 1 / C(K, 2)) and its pairs share one
    forward. Returns (sum of element losses, number of pairs ranked correctly, number of pairs); a
    tie (equal rewards, e.g. from the zero-initialized head) counts as not correct.
    """
    losses, correct, pairs = [], rewards.new_zeros(()), 0
    for r in rewards.split(group_sizes):                           # [K]
        i, j = pair_indices(r.shape[0], r.device)
        margin = r[i] - r[j]                                        # [K(K-1)/2]
        losses.append(-F.logsigmoid(margin).mean())
        correct = correct + (margin > 0).sum()
        pairs += margin.shape[0]
    return torch.stack(losses).sum(), correct, pairs
