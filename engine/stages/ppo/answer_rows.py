"""Single-turn answers, the rollout's simplest rows (a trajectory of one turn: `AnswerGenerator`),
sampled in whole groups (whole_groups.py) as requests of the engine's one loop
(HybridActor.run), the loop partial rollouts continue them through (partial.py) and trajectories
run in (agent_rows.py).

Rows are ordered prompt by prompt, sample by sample, so rows g*n .. g*n + n - 1 are group g
(scored_rows.py).
"""
from __future__ import annotations

from typing import Optional

from ...config.ppo import RolloutConfig
from ...data.prompts import PromptRow
from ...inference.request import Request
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
        rollout, n = self.rollout, self.rollout.samples_per_prompt
        params = sampling_params(rollout, seed, n)
        # One request per row, sample j of its prompt drawing the stream fixed by (seed, prompt,
        # j): the engine's one loop, as partial rollouts and trajectories run it (HybridActor.run).
        requests = [Request(ids, params, sample_index=j) for ids in prompts for j in range(n)]
        with timer.phase("generate"):
            seqs = self.models.actor.run(requests)
        logprobs = self.models.actor.device_logprobs(
            [slot for seq in seqs for slot in seq.logprob_slots])
        return Generated([list(seq.request.prompt) for seq in seqs],
                         [seq.completion_token_ids for seq in seqs], logprobs, n, sources,
                         routing=sampled_routing(self.models))

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
