"""The samples of an iteration: R = groups * n generated rows, their scores and their one pack.

Rows are ordered prompt by prompt, sample by sample, so rows g*n .. g*n + n - 1 are group g.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...data.device_tensors import device_tensor
from ...data.packing import PackedBatch
from .packs import concat_packs, pad_width


@dataclass
class Samples:
    """R = groups * n generated rows and their scores, packed once (the pack every forward of the
    iteration reads: scoring, reference, old log-probs, values, the update)."""
    prompts: list[list[int]]            # [R] prompt token ids of each row
    responses: list[list[int]]          # [R] sampled response ids
    packed: PackedBatch                 # the R rows, prompt + response, responses as targets
    sampler_logprobs: torch.Tensor      # [R, T] fp32 the sampler's log-prob of each response token
    scores: torch.Tensor                # [R] fp32, after overlong shaping
    n: int                              # responses per prompt
    sources: list | None = None         # [R] each row's data/prompts.py PromptRow, when known
    penalties: list[float] | None = None    # [R] <= 0: overlong shaping's, in `scores`
    # reward.per_turn: [R] each turn's [start, end) response columns and environment reward
    # (turn_credit.py); the rewards are in `scores` too, discounted across turns
    turn_spans: list | None = None
    turn_rewards: list | None = None

    @property
    def groups(self) -> int:
        return len(self.responses) // self.n

    def take_groups(self, groups: list[int]) -> "Samples":
        return self.take_rows([g * self.n + k for g in groups for k in range(self.n)])

    def take_rows(self, rows: list[int]) -> "Samples":
        """These rows (whole groups, for a group estimator: see finite_rows)."""
        pick = device_tensor(rows, torch.long, self.scores.device)

        def some(values):
            return None if values is None else [values[r] for r in rows]
        return Samples(some(self.prompts), some(self.responses), self.packed.select(rows),
                       self.sampler_logprobs.index_select(0, pick),
                       self.scores.index_select(0, pick), self.n, some(self.sources),
                       some(self.penalties), some(self.turn_spans), some(self.turn_rewards))

    @staticmethod
    def concat(parts: list["Samples"]) -> "Samples":
        """The rows of each part in turn (sampling rounds: their grids widened to the widest)."""
        packed = concat_packs([s.packed for s in parts])

        def joined(name):
            if getattr(parts[0], name) is None:
                return None
            return [x for s in parts for x in getattr(s, name)]
        return Samples(joined("prompts"), joined("responses"), packed,
                       torch.cat([pad_width(s.sampler_logprobs, packed.width) for s in parts]),
                       torch.cat([s.scores for s in parts]), parts[0].n, joined("sources"),
                       joined("penalties"),
                       joined("turn_spans"), joined("turn_rewards"))
