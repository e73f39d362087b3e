"""Critic-free advantages of a group's scores (GRPO's family, and distillation's reward term): the
group estimator of engine/kernels over each prompt's n rows, on every valid token of a row."""
from __future__ import annotations

import torch

from ....kernels import SumOver, group_advantages


def group_token_advantages(scores: torch.Tensor, mask: torch.Tensor, n: int, estimator: str,
                           sum_over: SumOver = None) -> torch.Tensor:
    """Critic-free advantages [R, T]: the group estimator over each prompt's n scores (rows g*n ..
    g*n + n - 1 are prompt g), each row's advantage on every one of its valid tokens; batch
    statistics (reinforce_pp_baseline) over every rank's groups with sum_over the ranks' sum.
    scores [R], mask [R, T] -> fp32 [R, T], 0 off the mask. A row with no valid token (an agent
    trajectory that left the batch) is no sample of its group: its score is not read and its
    group's statistics are the other rows'."""
    sampled = mask.bool().any(dim=-1).view(-1, n)
    per_row = group_advantages(scores.view(-1, n), estimator=estimator, sum_over=sum_over,
                               valid=sampled).reshape(-1)   # [R]
    return torch.where(mask.bool(), per_row[:, None], 0.0)
