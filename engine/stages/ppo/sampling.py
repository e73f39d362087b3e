"""The first half of an iteration: generate n responses per prompt and score them, with DAPO's
dynamic sampling (keep only prompt groups whose scores differ, drawing more prompts until the batch
is full) and overlong shaping (a soft penalty on responses near the length limit).

Rows are ordered prompt by prompt, sample by sample, so rows g*n .. g*n + n - 1 are group g
(samples.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ...parallel import distributed
from ...config.ppo import RolloutConfig
from ...inference.sampling_params import SamplingParams
from .models import PPOModels
from .packs import pack_rollout
from .phase_timer import PhaseTimer
from .samples import Samples
from .scoring import score_rows


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int,
                     penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), lengths [R] -> [R] fp32 <= 0:
    0 up to max_new_tokens - buffer, then falling linearly to -penalty at max_new_tokens."""
    if buffer == 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_new_tokens - buffer)).clamp(0, buffer)
    return -penalty * over / buffer


def varied_groups(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the groups of n consecutive scores that are not all equal (one host sync)."""
    grouped = scores.view(-1, n)
    varied = (grouped.amax(dim=1) > grouped.amin(dim=1)).tolist()
    return [g for g, ok in enumerate(varied) if ok]


def sample_and_score(models: PPOModels, prompts: list[list[int]], r: RolloutConfig, seed: int,
                     timer: PhaseTimer, sources: Optional[list] = None,
                     share_prompts: bool = False) -> Samples:
    """r.samples_per_prompt responses per prompt from the policy's current weights (models.actor),
    sampled as `r` says, scored by models.score (and overlong-shaped); `seed` fixes the sampling;
    timed as "generate" and "score". sources: the prompts' rows (each with `.prompt`, as the data
    holds it, and `.columns`, its other columns), for the reward functions (scoring.reward_inputs;
    None: the decoded prompts stand in, without columns). share_prompts (train.prefix_sharing):
    the pack's rows of one prompt read it once in every forward."""
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
    return score_samples(models, prompt_ids, responses, sampler_logprobs, r, timer, sources,
                         share_prompts)


def score_samples(models: PPOModels, prompt_ids: list[list[int]], responses: list[list[int]],
                  sampler_logprobs: torch.Tensor, r: RolloutConfig, timer: PhaseTimer,
                  sources: list | None = None, share_prompts: bool = False) -> Samples:
    """Generated rows (groups of r.samples_per_prompt; sampler_logprobs [sum of response lengths]
    fp32, row after row) packed and scored by models.score (and overlong-shaped); timed as
    "score". sources: each group's prompt row (sample_and_score's), kept per row and read by the
    reward functions (scoring.reward_inputs). share_prompts: see sample_and_score."""
    # where the policy runs (its resting shards may be in CPU memory)
    device = models.actor.llm.device
    # A prompt answered once has nothing to share.
    packed = pack_rollout(prompt_ids, responses, device,
                          share_prompts=share_prompts and r.samples_per_prompt > 1)
    # routing replay: the training forwards route as the sampler did
    if models.actor.record_routing:
        packed = packed._replace(routing=models.actor.last_routing.to(device))
    rows = None if sources is None else [p for p in sources for _ in range(r.samples_per_prompt)]
    with timer.phase("score"), torch.no_grad():
        scores = score_rows(models.score, prompt_ids, responses, packed, r.forward_tokens,
                            rows, models.ranks).float().to(device)    # [R]
    lengths = torch.tensor([len(x) for x in responses], device=scores.device)
    scores = scores + overlong_penalty(lengths, r.max_new_tokens, r.overlong_buffer,
                                       r.overlong_penalty)
    return Samples(prompt_ids, responses, packed, packed.to_grid(sampler_logprobs.to(device)),
                   scores, r.samples_per_prompt, rows)


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
