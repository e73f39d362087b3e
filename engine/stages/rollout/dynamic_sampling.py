"""DAPO's dynamic sampling (rollout.dynamic_sampling): keep only the prompt groups whose scores
differ (a group of equal scores has no signal for a group estimator). Whole groups draw more
prompts until the batch is full (`draw_samples`, at most rollout.max_sampling_rounds rounds);
partial rollouts keep the varied ones of each iteration's complete groups (`keep_varied`: the
groups in flight top the next iteration up).

Rows are ordered prompt by prompt, sample by sample, so rows g*n .. g*n + n - 1 are group g
(scored_rows.py).
"""
from __future__ import annotations

from typing import Callable

import torch

from ...config.ppo import RolloutConfig
from ...parallel import distributed
from .scored_rows import Samples


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


def keep_varied(samples: Samples, ranks: distributed.DataRanks = distributed.WORLD
                ) -> tuple[Samples, dict]:
    """The groups of `samples` whose scores differ, as many on every rank as on the rank that
    keeps fewest (over the data `ranks`), and the counts: groups_drawn, groups_kept (summed over
    the ranks)."""
    kept = samples.take_groups(varied_groups(samples.scores, samples.n))
    kept = kept.take_groups(list(range(distributed.min_over_ranks(kept.groups, ranks))))
    counts = {"groups_drawn": samples.groups, "groups_kept": kept.groups}
    return kept, distributed.all_reduce_sum(counts, ranks)
