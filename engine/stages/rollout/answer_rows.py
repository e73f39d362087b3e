"""Single-turn answers, the rollout's simplest rows (a trajectory of one turn): their
`advance(rows, stop)` (`advance_answers`, requests of the engine's one loop, HybridActor.run),
which whole groups run once with no stop rule (`AnswerGenerator`) and partial rollouts under
theirs (partial.py).

Rows are ordered prompt by prompt, sample by sample, so rows g*n .. g*n + n - 1 are group g
(scored_rows.py).
"""
from __future__ import annotations

from typing import Optional

from ...config.ppo import RolloutConfig
from ...data.prompts import PromptRow
from ...inference.in_flight import Group
from ...inference.request import Request
from ...inference.sampling_params import SamplingParams
from .rows import Rows, advance_rows, generated_of
from .sampled_rows import Generated, sampling_params, score_generated
from .models import PPOModels
from .phase_timer import PhaseTimer
from .scored_rows import Samples


def advance_answers(models: PPOModels, params: SamplingParams):
    """The `advance(rows, stop)` of single-turn answers (rows.py): each continued from where it
    stands (prompt + tokens prefilled, under the current weights: a carried answer's again),
    drawing its own seed's stream at its own positions (or, seed None, the stream params.seed fixes
    for its index), params.max_new_tokens counting its earlier tokens."""
    def advance(rows: Rows, stop) -> list:
        # A prompt's images (its row's, processed once when the data was read) go with each of
        # its samples' requests: the engine runs the vision tower once for them and shares its KV.
        seqs = models.actor.run([Request(group.prompt, params, answer=sample.tokens,
                                         sample_index=sample.index, seed=sample.seed,
                                         images=group.images)
                                 for group, sample in rows], stop)
        for (group, sample), seq in zip(rows, seqs):
            sample.tokens = seq.token_ids[len(group.prompt):]
            sample.logprobs = sample.logprobs + list(seq.logprobs)
            sample.finish = seq.finish_reason
        return seqs
    return advance


class AnswerGenerator:
    """rollout.samples_per_prompt single-turn answers per prompt from the policy's current weights
    (models.actor), sampled as `rollout` says: each a trajectory of one turn (every response token
    the model's), in whole groups (fresh ones advanced once, no stop rule)."""

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
        n = self.rollout.samples_per_prompt
        # Sample j of a prompt draws the stream fixed by (seed, prompt, j).
        groups = [Group.new(ids, n, source=None if sources is None else sources[g])
                  for g, ids in enumerate(prompts)]
        rows = [(group, sample) for group in groups for sample in group.samples]
        advance = advance_answers(self.models, sampling_params(self.rollout, seed, n))
        with timer.phase("generate"):
            advance_rows(self.models, rows, advance, None, 0)
        return generated_of(groups, n, self.models.actor.device)

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
