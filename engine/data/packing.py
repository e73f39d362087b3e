"""Packing tokenized examples into micro-batches of at most `tokens_per_batch` tokens.

A micro-batch is one flat token row with per-sequence lengths, the input of
`CausalLM.forward_packed`: no padding, no attention across sequences. The order of an epoch is a
seeded permutation, so (epoch, micro-batch index) is a complete data position for resuming.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .tokenization import TokenizedExample

IGNORE = -100


class SFTBatch(NamedTuple):
    input_ids: torch.Tensor  # [N] int64, sequences back to back
    seqlens: list[int]       # tokens per sequence, sum == N
    labels: torch.Tensor     # [N] next token where it is a response token, else IGNORE
    num_targets: int         # labels != IGNORE


class RMBatch(NamedTuple):
    input_ids: torch.Tensor  # [N] int64: for each example, prompt + response_k for k = 0..K-1
    seqlens: list[int]       # [S] tokens per sequence, S = sum(group_sizes)
    group_sizes: list[int]   # K of each example; its sequences are consecutive, best first
    lm_labels: torch.Tensor  # [N] next-token labels on the best response (beta_rm term), else IGNORE
    num_lm_targets: int


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def pack(sizes: list[int], budget: int) -> list[list[int]]:
    """Greedy in order: indices into `sizes` grouped so that each group's total is <= budget."""
    groups, total = [], budget + 1
    for i, size in enumerate(sizes):
        if size > budget:
            raise ValueError(f"an example of {size} tokens does not fit in tokens_per_batch={budget}; "
                             f"raise data.tokens_per_batch or lower data.max_length")
        if total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def epoch_batches(examples: list[TokenizedExample], budget: int, seed: int, epoch: int) -> list[list[TokenizedExample]]:
    """Micro-batches (lists of examples) of one epoch, shuffled by (seed, epoch), then packed."""
    order = epoch_order(len(examples), seed, epoch)
    groups = pack([examples[i].num_tokens for i in order], budget)
    return [[examples[order[j]] for j in group] for group in groups]


def response_labels(prompt: list[int], response: list[int]) -> list[int]:
    """Labels of the sequence prompt + response: position i predicts token i + 1, kept only when that
    token belongs to the response. The last position has nothing to predict."""
    tokens = prompt + response
    start = max(len(prompt), 1)  # with an empty prompt the first response token has no context
    return [tokens[i + 1] if i + 1 >= start else IGNORE for i in range(len(tokens) - 1)] + [IGNORE]


def collate_sft(examples: list[TokenizedExample]) -> SFTBatch:
    ids, labels, seqlens = [], [], []
    for ex in examples:
        (response,) = ex.responses
        ids += ex.prompt + response
        labels += response_labels(ex.prompt, response)
        seqlens.append(len(ex.prompt) + len(response))
    labels_t = torch.tensor(labels, dtype=torch.int64)
    return SFTBatch(torch.tensor(ids, dtype=torch.int64), seqlens, labels_t, int((labels_t != IGNORE).sum()))


def collate_rm(examples: list[TokenizedExample]) -> RMBatch:
    ids, labels, seqlens, groups = [], [], [], []
    for ex in examples:
        for k, response in enumerate(ex.responses):
            ids += ex.prompt + response
            seqlens.append(len(ex.prompt) + len(response))
            labels += response_labels(ex.prompt, response) if k == 0 else [IGNORE] * seqlens[-1]
        groups.append(len(ex.responses))
    labels_t = torch.tensor(labels, dtype=torch.int64)
    return RMBatch(torch.tensor(ids, dtype=torch.int64), seqlens, groups, labels_t,
                   int((labels_t != IGNORE).sum()))
