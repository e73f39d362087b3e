"""Whole groups, the schedule of every group sampled to its end in the iteration that drew its
prompt (`WholeGroups`), over any rows (single-turn answers or multi-turn trajectories: a
`RowGenerator`), and DAPO's dynamic sampling (`draw_samples`): keep only prompt groups whose scores
differ, drawing more prompts until the batch is full.

Rows are ordered prompt by prompt, sample by sample, so rows g*n .. g*n + n - 1 are group g
(scored_rows.py).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from ...config.ppo import PPOConfig, RolloutConfig
from ...data.prompts import PromptRow
from ...parallel import distributed
from .phase_timer import PhaseTimer
from .state import PPOState
from .sampled_rows import Generated
from .scored_rows import Samples


class RowGenerator(Protocol):
    """What a group's rows are: generate(prompt rows, seed, timer) -> Generated, R = rows x
    rollout.samples_per_prompt; take_metrics(): what the rows since the last call did."""

    def generate(self, sources: list[PromptRow], seed: int, timer: PhaseTimer) -> Generated: ...

    def take_metrics(self) -> dict: ...


class WholeGroups:
    """Every group sampled to its end in the iteration that drew its prompt: prompts_per_iteration
    prompt rows from the stream, their rows scored (with rollout.dynamic_sampling: the groups of
    equal scores dropped and more drawn, draw_samples)."""

    def __init__(self, rows: RowGenerator,
                 draw_prompts: Callable[[PPOState, int], list[PromptRow]],
                 score: Callable[[Generated, PhaseTimer], Samples], cfg: PPOConfig,
                 ranks: distributed.DataRanks):
        self.rows, self.draw_prompts, self.score = rows, draw_prompts, score
        self.rollout, self.ranks = cfg.rollout, ranks

    def sample(self, state: PPOState, seed: int, timer: PhaseTimer) -> tuple[Samples, dict]:
        """The iteration's groups and metrics: dynamic sampling's and the rows' (every round's)."""
        samples, metrics = draw_samples(
            lambda: self.draw_prompts(state, self.rollout.prompts_per_iteration),
            lambda batch, seed: self.score(self.rows.generate(batch, seed, timer), timer),
            self.rollout, seed, self.ranks)
        return samples, {**metrics, **self.rows.take_metrics()}

    def close(self) -> None:
        """Nothing outlives an iteration here."""


def varied_groups(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the groups of n consecutive scores that are not all equal (one host sync)."""
    grouped = scores.view(-1, n)
    varied = (grouped.amax(dim=1) > grouped.amin(dim=1)).tolist()
    return [g for g, ok in enumerate(varied) if ok]


def draw_samples(draw_prompts: Callable[[], list],
                 sample: Callable[[list, int], Samples], rollout: RolloutConfig, seed: int,
                 ranks: distributed.DataRanks = distributed.WORLD
                 ) -> tuple[Samples, dict]:
    """One iteration's samples: prompts_per_iteration groups from draw_prompts() (the next prompts
    of the stream), sampled whole and scored with sample(prompts, seed) (single-turn answers or
    multi-turn trajectories). With rollout.dynamic_sampling, groups whose scores are all equal (no
    signal for a group estimator) are dropped and further prompts drawn, at most
    rollout.max_sampling_rounds rounds; the batch may then hold fewer groups (possibly none: the
    caller skips the iteration). Returns the samples and their metrics.

    Under torchrun draw_prompts() gives this rank's share; the rounds and the groups kept are
    decided on the rank that keeps fewest, so every rank generates as often and keeps as many
    (over the data `ranks`: PPOModels.ranks)."""
    samples = sample(draw_prompts(), seed)
    if not rollout.dynamic_sampling:
        return samples, {}
    target = rollout.prompts_per_iteration  # groups per rank
    kept, rounds, drawn = [], 1, samples.groups
    while True:
        keep = varied_groups(samples.scores, samples.n)
        kept.append(samples.take_groups(keep))
        if (distributed.min_over_ranks(sum(k.groups for k in kept), ranks) >= target
                or rounds == rollout.max_sampling_rounds):
            break
        samples = sample(draw_prompts(), seed + 7919 * rounds)  # a fresh seed per round
        rounds, drawn = rounds + 1, drawn + samples.groups
    batch = Samples.concat(kept)
    fewest = distributed.min_over_ranks(batch.groups, ranks)
    batch = batch.take_groups(list(range(min(fewest, target))))
    counts = distributed.all_reduce_sum({"groups_drawn": drawn, "groups_kept": batch.groups}, ranks)
    return batch, {"sampling_rounds": rounds, **counts}
