"""Packing tokenized examples into micro-batches of at most `tokens_per_batch` tokens.

A micro-batch is one flat token row with per-sequence lengths, the input of
`CausalLM.forward_packed`: no padding, no attention across sequences. The order of an epoch is a
seeded permutation, so (epoch, micro-batch index) is a complete data position for resuming.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Optional

import torch

from ..errors import ConfigValueError
from .tokenization import TokenizedExample


class PackedBatch(NamedTuple):
    """Sequences packed back to back for one `CausalLM.forward_packed`, with their training targets.

    The one batch type of every stage. A target is a packed position whose hidden state predicts
    the next token (SFT: the response tokens; RM: the best response's tokens, for the beta_rm LM
    term; PPO: the sampled response tokens). Targets are stored sequence by sequence.
    """
    input_ids: torch.Tensor      # [N] int64, sequences back to back
    seqlens: list[int]           # [S] tokens per sequence, sum == N
    target_rows: torch.Tensor    # [M] int64 packed positions predicting a target
    target_ids: torch.Tensor     # [M] int64 the tokens they predict
    target_counts: list[int]     # [S] targets of each sequence, sum == M
    group_sizes: list[int] = []  # RM: K consecutive sequences per example, best first
    grid_index: Optional[torch.Tensor] = None  # PPO: [M] flat index of each target in the [S, width] grid
    width: int = 0               # PPO: T of that grid, the longest response

    @property
    def num_targets(self) -> int:
        return sum(self.target_counts)

    def to_grid(self, values: torch.Tensor) -> torch.Tensor:
        """Per-target values [M] -> [S, width], zeros off the targets (PPO's per-token layout)."""
        grid = values.new_zeros(len(self.seqlens) * self.width)
        return grid.index_copy(0, self.grid_index, values).view(len(self.seqlens), self.width)

    def grid_mask(self) -> torch.Tensor:
        """[S, width] bool, True where a target is."""
        return self.to_grid(torch.ones(self.num_targets, device=self.target_ids.device)) > 0

    def select(self, seqs: list[int]) -> "PackedBatch":
        """The sub-batch of sequences `seqs` (in that order), cut from this batch's tensors: packing
        is done once (e.g. per rollout), not again for every minibatch of every epoch."""
        token_starts = _starts(self.seqlens)
        target_starts = _starts(self.target_counts)
        ids, rows, targets, grid = [], [], [], []
        position = 0
        for new, s in enumerate(seqs):
            t0, t1 = target_starts[s], target_starts[s] + self.target_counts[s]
            ids.append(self.input_ids[token_starts[s]:token_starts[s] + self.seqlens[s]])
            rows.append(self.target_rows[t0:t1] + (position - token_starts[s]))
            targets.append(self.target_ids[t0:t1])
            if self.grid_index is not None:
                grid.append(self.grid_index[t0:t1] + (new - s) * self.width)
            position += self.seqlens[s]
        return PackedBatch(torch.cat(ids), [self.seqlens[s] for s in seqs], torch.cat(rows), torch.cat(targets),
                           [self.target_counts[s] for s in seqs], [], torch.cat(grid) if grid else None,
                           self.width)


def _starts(sizes: list[int]) -> list[int]:
    return list(itertools.accumulate(sizes, initial=0))[:-1]


def pack_sequences(sequences: list[tuple[list[int], list[int], bool]], *, group_sizes: list[int] = (),
                   width: int = 0, device=None) -> PackedBatch:
    """Pack (prompt, response, is_target) triples: each becomes prompt + response, and when
    is_target its response tokens are targets. width > 0 adds the [S, width] grid of PPO."""
    ids, seqlens, rows, targets, counts, grid = [], [], [], [], [], []
    for s, (prompt, response, is_target) in enumerate(sequences):
        # Position i predicts token i + 1; with an empty prompt the first response token has no context.
        first = max(len(prompt), 1)
        n = len(prompt) + len(response) - first if is_target else 0
        rows += range(len(ids) + first - 1, len(ids) + first - 1 + n)
        targets += (prompt + response)[first:first + n]
        grid += range(s * width, s * width + n) if width else []
        counts.append(n)
        ids += prompt + response
        seqlens.append(len(prompt) + len(response))
    as_long = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    return PackedBatch(as_long(ids), seqlens, as_long(rows), as_long(targets), counts, list(group_sizes),
                       as_long(grid) if width else None, width)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def pack(sizes: list[int], budget: int, budget_name: str = "tokens_per_batch") -> list[list[int]]:
    """Greedy in order: indices into `sizes` grouped so that each group's total is <= budget
    (data.`budget_name`, named in the error when one size exceeds it)."""
    groups, total = [], budget + 1
    for i, size in enumerate(sizes):
        if size > budget:
            raise ConfigValueError(f"an example of {size} tokens does not fit in {budget_name}={budget}; "
                                   f"raise data.{budget_name} or lower data.max_length")
        if total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def epoch_batches(examples: list[TokenizedExample], budget: int, seed: int, epoch: int,
                  budget_name: str = "tokens_per_batch") -> list[list[TokenizedExample]]:
    """Micro-batches (lists of examples) of one epoch, shuffled by (seed, epoch), then packed
    (budget: data.`budget_name`)."""
    order = epoch_order(len(examples), seed, epoch)
    groups = pack([examples[i].num_tokens for i in order], budget, budget_name)
    return [[examples[order[j]] for j in group] for group in groups]


def collate_sft(examples: list[TokenizedExample]) -> PackedBatch:
    """SFT micro-batch: every response token is a target."""
    return pack_sequences([(ex.prompt, ex.responses[0], True) for ex in examples])


def collate_rm(examples: list[TokenizedExample]) -> PackedBatch:
    """RM micro-batch: each example's K sequences, best first; the best response's tokens are the
    targets of the beta_rm LM term."""
    sequences = [(ex.prompt, response, k == 0) for ex in examples for k, response in enumerate(ex.responses)]
    return pack_sequences(sequences, group_sizes=[len(ex.responses) for ex in examples])
