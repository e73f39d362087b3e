"""The first half of an iteration: generate n responses per prompt and score them, with DAPO's
dynamic sampling (keep only prompt groups whose scores differ, drawing more prompts until the batch
is full) and overlong shaping (a soft penalty on responses near the length limit).

Rows are ordered prompt by prompt, sample by sample, so rows g*n .. g*n + n - 1 are group g.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...config.ppo import PPOConfig
from ...data.packing import PackedBatch
from ...inference.sampling_params import SamplingParams
from ... import distributed
from .rollout import concat_packs, pack_rollout, pad_width
from .scoring import score_rows


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

    @property
    def groups(self) -> int:
        return len(self.responses) // self.n

    def take_groups(self, groups: list[int]) -> "Samples":
        return self.take_rows([g * self.n + k for g in groups for k in range(self.n)])

    def take_rows(self, rows: list[int]) -> "Samples":
        """These rows (whole groups, for a group estimator: see finite_rows)."""
        pick = torch.tensor(rows, dtype=torch.long, device=self.scores.device)
        return Samples([self.prompts[r] for r in rows], [self.responses[r] for r in rows], self.packed.select(rows),
                       self.sampler_logprobs.index_select(0, pick),
                       self.scores.index_select(0, pick), self.n)

    @staticmethod
    def concat(parts: list["Samples"]) -> "Samples":
        """The rows of each part in turn (sampling rounds: their grids widened to the widest)."""
        packed = concat_packs([s.packed for s in parts])
        return Samples([p for s in parts for p in s.prompts], [r for s in parts for r in s.responses], packed,
                       torch.cat([pad_width(s.sampler_logprobs, packed.width) for s in parts]),
                       torch.cat([s.scores for s in parts]), parts[0].n)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
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


def sample_and_score(models, prompts: list[list[int]], cfg: PPOConfig, seed: int, timer) -> Samples:
    """n responses per prompt from the policy's current weights (models.actor), scored by
    models.score (and overlong-shaped); `seed` fixes the sampling; timed as "generate" and "score"."""
    r = cfg.rollout
    params = SamplingParams(n=r.samples_per_prompt, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                            max_new_tokens=r.max_new_tokens, ignore_eos=r.ignore_eos, seed=seed)
    with timer.phase("generate"):
        prompt_ids, responses, sampler_logprobs = models.actor.generate(prompts, params)
    device = next(models.policy.parameters()).device
    packed = pack_rollout(prompt_ids, responses, device)
    with timer.phase("score"), torch.no_grad():
        scores = score_rows(models.score, prompt_ids, responses, packed).float().to(device)    # [R]
    lengths = torch.tensor([len(x) for x in responses], device=scores.device)
    scores = scores + overlong_penalty(lengths, r.max_new_tokens, r.overlong_buffer, r.overlong_penalty)
    return Samples(prompt_ids, responses, packed, packed.to_grid(sampler_logprobs.to(device)), scores,
                   r.samples_per_prompt)


def draw_samples(draw_prompts: Callable[[], list[list[int]]], sample: Callable[[list[list[int]], int], Samples],
                 cfg: PPOConfig, seed: int) -> tuple[Samples, dict]:
    """One iteration's samples: prompts_per_iteration groups from draw_prompts() (the next prompts
    of the stream), sampled with sample(prompts, seed). With rollout.dynamic_sampling, groups whose
    scores are all equal (no signal for a group estimator) are dropped and further prompts drawn,
    at most rollout.max_sampling_rounds rounds; the batch may then hold fewer groups (possibly
    none: the caller skips the iteration). Returns the samples and their metrics.

    Under torchrun draw_prompts() gives this rank's share; the rounds and the groups kept are
    decided on the rank that keeps fewest, so every rank generates as often and keeps as many."""
    r = cfg.rollout
    samples = sample(draw_prompts(), seed)
    if not r.dynamic_sampling:
        return samples, {}
    target = r.prompts_per_iteration  # groups per rank
    kept, rounds, drawn = [], 1, samples.groups
    while True:
        keep = varied_groups(samples.scores, samples.n)
        kept.append(samples.take_groups(keep))
        if (distributed.min_over_ranks(sum(k.groups for k in kept)) >= target
                or rounds == r.max_sampling_rounds):
            break
        samples = sample(draw_prompts(), seed + 7919 * rounds)  # a fresh seed per round
        rounds, drawn = rounds + 1, drawn + samples.groups
    batch = Samples.concat(kept)
    batch = batch.take_groups(list(range(min(distributed.min_over_ranks(batch.groups), target))))
    counts = distributed.all_reduce_sum({"groups_drawn": drawn, "groups_kept": batch.groups})
    return batch, {"sampling_rounds": rounds, **counts}
