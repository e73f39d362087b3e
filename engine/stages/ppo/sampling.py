"""The first half of a single-turn iteration: generate n responses per prompt and score them
(generated.py, with overlong shaping), with DAPO's dynamic sampling (keep only prompt groups whose
scores differ, drawing more prompts until the batch is full).

Rows are ordered prompt by prompt, sample by sample, so rows g*n .. g*n + n - 1 are group g
(samples.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ...parallel import distributed
from ...config.ppo import RolloutConfig
from ...inference.sampling_params import SamplingParams
from .generated import Generated, score_generated
from .models import PPOModels
from .phase_timer import PhaseTimer
from .samples import Samples


def varied_groups(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the groups of n consecutive scores that are not all equal (one host sync)."""
    grouped = scores.view(-1, n)
    varied = (grouped.amax(dim=1) > grouped.amin(dim=1)).tolist()
    return [g for g, ok in enumerate(varied) if ok]


def sample_and_score(models: PPOModels, prompts: list[list[int]], r: RolloutConfig, seed: int,
                     timer: PhaseTimer, sources: Optional[list] = None,
                     share_prompts: bool = False) -> Samples:
    """r.samples_per_prompt responses per prompt from the policy's current weights (models.actor),
    sampled as `r` says, then packed and scored as every mode's rows are (generated.py); `seed`
    fixes the sampling; timed as "generate" and "score". sources: the prompts' rows (each with
    `.prompt`, as the data holds it, and `.columns`, its other columns), for the reward functions
    (scoring.reward_inputs; None: the decoded prompts stand in, without columns). share_prompts
    (train.prefix_sharing): the pack's rows of one prompt read it once in every forward."""
    params = SamplingParams(n=r.samples_per_prompt, temperature=r.temperature, top_k=r.top_k,
                            top_p=r.top_p, max_new_tokens=r.max_new_tokens, ignore_eos=r.ignore_eos,
                            seed=seed)
    with timer.phase("generate"):
        prompt_ids, responses, sampler_logprobs = models.actor.generate(prompts, params)
        cp = models.policy.context_parallel
        # a context group's ranks sampled its rows alike: they train its first rank's
        if cp is not None:
            prompt_ids, responses, host = cp.same_on_ranks(
                (prompt_ids, responses, sampler_logprobs.cpu()))
            sampler_logprobs = host.to(sampler_logprobs.device)
    return score_generated(models, Generated(prompt_ids, responses, sampler_logprobs,
                                             r.samples_per_prompt, sources), r, timer,
                           share_prompts)


def draw_samples(draw_prompts: Callable[[], list[list[int]]],
                 sample: Callable[[list[list[int]], int], Samples], r: RolloutConfig, seed: int,
                 ranks: distributed.DataRanks = distributed.WORLD
                 ) -> tuple[Samples, dict]:
    """One iteration's samples: prompts_per_iteration groups from draw_prompts() (the next prompts
    of the stream), sampled with sample(prompts, seed). With rollout.dynamic_sampling, groups whose
    scores are all equal (no signal for a group estimator) are dropped and further prompts drawn,
    at most rollout.max_sampling_rounds rounds; the batch may then hold fewer groups (possibly
    none: the caller skips the iteration). Returns the samples and their metrics.

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
