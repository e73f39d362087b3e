"""A PPO batch of experience: R sequences (prompt + sampled response), per-token data as [R, T]
(experience.py builds it from scored samples, update.py learns from it).

T is the longest response; `mask` [R, T] is True on each row's response tokens. A row's sequence is
packed for the training forward as prompt + response (a PackedBatch whose targets are the response
tokens), and the hidden state at the position before each response token is the one that predicts it
(and whose value the critic reads). The rows are packed once, right after generation: scoring, the
reference, old log-probs, values and the update's minibatches read that pack (cut by index).

Under torchrun each rank holds its share of the rollout's rows (the same number on every rank: rows
dropped on one rank are balanced by dropping as many whole groups on the others); statistics that
shape the update (score normalization, advantage whitening, the group baseline of
reinforce_pp_baseline, the KL that drives the controller) and the metrics are taken over all ranks:
fusedrl.kernels' statistics with `sum_over` the ranks' sum (distributed.data_parallel_sum).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...data.device_tensors import device_tensor
from ...data.packing import PackedBatch


@dataclass
class PPOBatch:
    """Everything one PPO iteration learns from. Per-token fields are [R, T] fp32 (mask bool)."""
    packed: PackedBatch           # the R prompt + response sequences, packed once per rollout
    mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    scores: torch.Tensor          # [R] reward-model (or function) scores, before normalization
    rewards: torch.Tensor         # per-token shaped rewards
    advantages: torch.Tensor
    returns: torch.Tensor

    def rows(self, index: list[int]) -> "PPOBatch":
        """The sub-batch of the given rows (same width T), every field cut by one index tensor."""
        pick = device_tensor(index, torch.int64, self.mask.device)
        fields = {name: value.index_select(0, pick) for name, value in vars(self).items()
                  if isinstance(value, torch.Tensor)}
        return PPOBatch(packed=self.packed.select(index), **fields)
