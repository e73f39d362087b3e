"""Single-turn answers, the rollout's simplest rows (a trajectory of one turn: `AnswerGenerator`),
sampled in whole groups (whole_groups.py); partial rollouts continue them themselves
(partial.py).

Rows are ordered prompt by prompt, sample by sample, so rows g*n .. g*n + n - 1 are group g
(scored_rows.py).
"""
from __future__ import annotations

from typing import Optional

from ...config.ppo import RolloutConfig
from ...data.prompts import PromptRow
from .sampled_rows import Generated, sampled_routing, sampling_params, score_generated
from .models import PPOModels
from .phase_timer import PhaseTimer
from .scored_rows import Samples


class AnswerGenerator:
    """rollout.samples_per_prompt single-turn answers per prompt from the policy's current weights
    (models.actor), sampled as `rollout` says: each a trajectory of one turn (every response token
    the model's)."""

    def __init__(self, models: PPOModels, rollout: RolloutConfig):
        self.models, self.rollout = models, rollout

    def generate(self, sources: list[PromptRow], seed: int, timer: PhaseTimer) -> Generated:
        """The answers to these prompt rows (their `.ids`; the rows go to the reward functions:
        reward_scores.reward_inputs); `seed` fixes the sampling; timed as "generate"."""
        return self.answers([p.ids for p in sources], seed, timer, sources)

    def answers(self, prompts: list[list[int]], seed: int, timer: PhaseTimer,
                sources: Optional[list[PromptRow]] = None) -> Generated:
        """generate() on prompt token ids [groups][prompt tokens]; sources: their rows, or None
        (the decoded prompts stand in for the reward functions, without columns)."""
        rollout = self.rollout
        with timer.phase("generate"):
            prompt_ids, responses, sampler_logprobs = self.models.actor.generate(
                prompts, sampling_params(rollout, seed, rollout.samples_per_prompt))
        return Generated(prompt_ids, responses, sampler_logprobs, rollout.samples_per_prompt,
                         sources, routing=sampled_routing(self.models))

    def take_metrics(self) -> dict:
        """What the answers since the last call did: nothing beyond their rows' metrics."""
        return {}


def sample_and_score(models: PPOModels, prompts: list[list[int]], rollout: RolloutConfig, seed: int,
                     timer: PhaseTimer, sources: Optional[list] = None,
                     share_prompts: bool = False) -> Samples:
    """One round of single-turn answers to `prompts` (token ids), scored as every mode's rows are
    (sampled_rows.py; share_prompts: train.prefix_sharing): a run's rollout outside a run (unit
    tests, benchmarks)."""
    generated = AnswerGenerator(models, rollout).answers(prompts, seed, timer, sources)
    return score_generated(models, generated, rollout, timer, share_prompts)
