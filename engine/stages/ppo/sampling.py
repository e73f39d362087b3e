"""Single-turn answers, the rollout's simplest rows (a trajectory of one turn: `AnswerGenerator`),
and DAPO's dynamic sampling (`draw_samples`), which wraps any sampler of whole groups, single-turn
or multi-turn: keep only prompt groups whose scores differ, drawing more prompts until the batch is
full. sampler.py puts them together into the run's one rollout interface.

Rows are ordered prompt by prompt, sample by sample, so rows g*n .. g*n + n - 1 are group g
(samples.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ...parallel import distributed
from ...config.ppo import RolloutConfig
from ...data.prompts import PromptRow
from .generated import Generated, sampled_routing, sampling_params, score_generated
from .models import PPOModels
from .phase_timer import PhaseTimer
from .samples import Samples


class AnswerGenerator:
    """r.samples_per_prompt single-turn answers per prompt from the policy's current weights
    (models.actor), sampled as `r` says: each a trajectory of one turn (every response token the
    model's)."""

    def __init__(self, models: PPOModels, r: RolloutConfig):
        self.models, self.r = models, r

    def generate(self, sources: list[PromptRow], seed: int, timer: PhaseTimer) -> Generated:
        """The answers to these prompt rows (their `.ids`; the rows go to the reward functions:
        scoring.reward_inputs); `seed` fixes the sampling; timed as "generate"."""
        return self.answers([p.ids for p in sources], seed, timer, sources)

    def answers(self, prompts: list[list[int]], seed: int, timer: PhaseTimer,
                sources: Optional[list[PromptRow]] = None) -> Generated:
        """generate() on prompt token ids [groups][prompt tokens]; sources: their rows, or None
        (the decoded prompts stand in for the reward functions, without columns)."""
        r = self.r
        with timer.phase("generate"):
            prompt_ids, responses, sampler_logprobs = self.models.actor.generate(
                prompts, sampling_params(r, seed, r.samples_per_prompt))
        return Generated(prompt_ids, responses, sampler_logprobs, r.samples_per_prompt, sources,
                         routing=sampled_routing(self.models))

    def take_metrics(self) -> dict:
        """What the answers since the last call did: nothing beyond their rows' metrics."""
        return {}


def sample_and_score(models: PPOModels, prompts: list[list[int]], r: RolloutConfig, seed: int,
                     timer: PhaseTimer, sources: Optional[list] = None,
                     share_prompts: bool = False) -> Samples:
    """One round of single-turn answers to `prompts` (token ids), scored as every mode's rows are
    (generated.py; share_prompts: train.prefix_sharing): a run's rollout outside a run (unit tests,
    benchmarks)."""
    generated = AnswerGenerator(models, r).answers(prompts, seed, timer, sources)
    return score_generated(models, generated, r, timer, share_prompts)


def varied_groups(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the groups of n consecutive scores that are not all equal (one host sync)."""
    grouped = scores.view(-1, n)
    varied = (grouped.amax(dim=1) > grouped.amin(dim=1)).tolist()
    return [g for g, ok in enumerate(varied) if ok]


def draw_samples(draw_prompts: Callable[[], list],
                 sample: Callable[[list, int], Samples], r: RolloutConfig, seed: int,
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
    if not r.dynamic_sampling:
        return samples, {}
    target = r.prompts_per_iteration  # groups per rank
    kept, rounds, drawn = [], 1, samples.groups
    while True:
        keep = varied_groups(samples.scores, samples.n)
        kept.append(samples.take_groups(keep))
        if (distributed.min_over_ranks(sum(k.groups for k in kept), ranks) >= target
                or rounds == r.max_sampling_rounds):
            break
        samples = sample(draw_prompts(), seed + 7919 * rounds)  # a fresh seed per round
        rounds, drawn = rounds + 1, drawn + samples.groups
    batch = Samples.concat(kept)
    fewest = distributed.min_over_ranks(batch.groups, ranks)
    batch = batch.take_groups(list(range(min(fewest, target))))
    counts = distributed.all_reduce_sum({"groups_drawn": drawn, "groups_kept": batch.groups}, ranks)
    return batch, {"sampling_rounds": rounds, **counts}
