"""Whole groups, the schedule of every group sampled to its end in the iteration that drew its
prompt (`WholeGroups`): fresh groups advanced once with no stop rule and nothing carried, over any
rows (single-turn answers or multi-turn trajectories: a `RowGenerator`), with DAPO's dynamic
sampling where asked (dynamic_sampling.draw_samples).

Rows are ordered prompt by prompt, sample by sample, so rows g*n .. g*n + n - 1 are group g
(scored_rows.py).
"""
from __future__ import annotations

from typing import Callable, Protocol

from ...config.ppo import PPOConfig
from ...data.prompts import PromptRow
from ...parallel import distributed
from .dynamic_sampling import draw_samples
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
