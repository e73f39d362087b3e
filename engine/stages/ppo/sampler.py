"""The run's one rollout interface: `Sampler.sample(state, seed, timer) -> (Samples | None,
metrics)`, built once from the config (`build_sampler`).

A sampler is two choices and one shared path:
- its rows (a `RowGenerator`): single-turn answers (sampling.AnswerGenerator, a trajectory of one
  turn) or multi-turn trajectories with tools or an environment
  (agent_sampling.TrajectoryGenerator); both hand on the same `Generated` rows;
- its schedule: whole groups, every answer sampled to its end in the iteration that drew its
  prompt (`WholeGroups`, with DAPO's dynamic sampling where asked: sampling.draw_samples), or
  partial rollouts, groups carried across iterations under a token budget (partial.py: answers,
  or trajectories whose environments stay alive in flight, engine/agents/carried.py).
  Speculative decoding is a policy of the actor's decode scheduler (engine/inference) under either;
- everything after sampling, once for every mode (generated.Scoring: the pack with prefix sharing,
  routing replay's records, the scores with overlong shaping and per-turn rewards), and the
  iteration's metrics of what the rows and the decode scheduler did.
A pair of options no mode runs is refused by engine/config/compatibility.py before any model loads.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

from ...config.ppo import PPOConfig
from ...data.prompts import PromptRow
from ...parallel import distributed
from .agent_sampling import Agents, TrajectoryGenerator
from ...agents import CarriedTrajectories
from .generated import Generated, Scoring, sampling_params
from .models import PPOModels
from .partial import PartialRollouts
from .phase_timer import PhaseTimer
from .prompt_stream import next_prompts
from .samples import Samples
from .sampling import AnswerGenerator, draw_samples
from .state import PPOState


class RowGenerator(Protocol):
    """What a group's rows are: generate(prompt rows, seed, timer) -> Generated, R = rows x
    rollout.samples_per_prompt; take_metrics(): what the rows since the last call did."""

    def generate(self, sources: list[PromptRow], seed: int, timer: PhaseTimer) -> Generated: ...

    def take_metrics(self) -> dict: ...


class Schedule(Protocol):
    """Which groups an iteration hands on: sample(state, seed, timer) -> (Samples | None, metrics),
    the scored groups (None: none complete yet) and the schedule's metrics; close(): what it keeps
    open across iterations, closed at the run's end."""

    def sample(self, state: PPOState, seed: int,
               timer: PhaseTimer) -> tuple[Optional[Samples], dict]: ...

    def close(self) -> None: ...


class WholeGroups:
    """Every group sampled to its end in the iteration that drew its prompt: prompts_per_iteration
    prompt rows from the stream, their rows scored (with rollout.dynamic_sampling: the groups of
    equal scores dropped and more drawn, sampling.draw_samples)."""

    def __init__(self, rows: RowGenerator,
                 draw_prompts: Callable[[PPOState, int], list[PromptRow]],
                 score: Callable[[Generated, PhaseTimer], Samples], cfg: PPOConfig,
                 ranks: distributed.DataRanks):
        self.rows, self.draw_prompts, self.score = rows, draw_prompts, score
        self.r, self.ranks = cfg.rollout, ranks

    def sample(self, state: PPOState, seed: int, timer: PhaseTimer) -> tuple[Samples, dict]:
        """The iteration's groups and metrics: dynamic sampling's and the rows' (every round's)."""
        samples, metrics = draw_samples(
            lambda: self.draw_prompts(state, self.r.prompts_per_iteration),
            lambda batch, seed: self.score(self.rows.generate(batch, seed, timer), timer),
            self.r, seed, self.ranks)
        return samples, {**metrics, **self.rows.take_metrics()}

    def close(self) -> None:
        """Nothing outlives an iteration here."""


class Sampler:
    """The rollout of every iteration: its schedule's scored groups and the metrics of the
    schedule (its rows' included) and speculative decoding (spec/drafted, spec/accepted: the
    draft tokens verified and accepted, summed over the data ranks)."""

    def __init__(self, models: PPOModels, schedule: Schedule, speculative: bool):
        self.models, self.schedule, self.speculative = models, schedule, speculative

    def sample(self, state: PPOState, seed: int,
               timer: PhaseTimer) -> tuple[Optional[Samples], dict]:
        """This iteration's samples (None: every group still has answers in flight) and the
        metrics of their sampling; `seed` fixes it; timed as "generate" and "score"."""
        samples, metrics = self.schedule.sample(state, seed, timer)
        if self.speculative:
            spec = distributed.all_reduce_sum(self.models.actor.llm.take_speculation(),
                                              self.models.ranks)
            metrics.update({f"spec/{k}": v for k, v in spec.items()})
        return samples, metrics

    def close(self) -> None:
        """What the schedule keeps open (partial rollouts' environments in flight)."""
        self.schedule.close()


def build_sampler(cfg: PPOConfig, models: PPOModels, prompts: list[PromptRow],
                  agents: Optional[Agents]) -> Sampler:
    """The run's sampler: multi-turn trajectories with `agents` (rollout.tools or
    rollout.environment: agent_sampling.build_agents), else single-turn answers; partial rollouts
    with rollout.partial_rollouts, else whole groups; prompts drawn from `prompts` in the seeded
    stream of prompt_stream.py."""
    r = cfg.rollout

    def draw(state: PPOState, count: int) -> list[PromptRow]:
        return next_prompts(prompts, count, cfg.seed, state, models.ranks)
    score = Scoring.of(cfg, models)
    if r.partial_rollouts:
        carried = None if agents is None else CarriedTrajectories(
            models.actor.run, agents.renderer, agents.source,
            sampling_params(r, n=r.samples_per_prompt), agents.limits,
            models.actor.llm.config.max_model_len)
        schedule = PartialRollouts(models, draw, score, r, carried)
    else:
        rows = (AnswerGenerator(models, r) if agents is None
                else TrajectoryGenerator(models, agents, r))
        schedule = WholeGroups(rows, draw, score, cfg, models.ranks)
    return Sampler(models, schedule, bool(r.speculative_tokens))
