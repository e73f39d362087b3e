"""The run's one rollout interface: `Sampler.sample(state, seed, timer) -> (Samples | None,
metrics)`, built once from the config (`build_sampler`).

A sampler is two choices and one shared path:
- its rows (a `RowGenerator`): single-turn answers (answer_rows.AnswerGenerator, a trajectory of one
  turn) or multi-turn trajectories with tools or an environment
  (agent_rows.TrajectoryGenerator); both hand on the same `Generated` rows;
- its schedule: whole groups, every answer sampled to its end in the iteration that drew its
  prompt (`WholeGroups`, with DAPO's dynamic sampling where asked: whole_groups.py), or
  partial rollouts, groups carried across iterations under a token budget (partial.py: answers,
  or trajectories whose environments stay alive in flight, engine/agents/carried.py).
  Speculative decoding is a policy of the actor's decode scheduler (engine/inference) under either;
- everything after sampling, once for every mode (sampled_rows.Scoring: the pack with prefix
  sharing, routing replay's records, the scores with overlong shaping and per-turn rewards), and
  the iteration's metrics of what the rows and the decode scheduler did.
A pair of options no mode runs is refused by engine/config/compatibility.py before any model loads.
"""
from __future__ import annotations

from typing import Optional, Protocol

from ...config.ppo import PPOConfig
from ...data.prompts import PromptRow
from ...parallel import distributed
from .agent_rows import Agents, TrajectoryGenerator
from ...agents import CarriedTrajectories
from .sampled_rows import Scoring, sampling_params
from .models import PPOModels
from .partial import PartialRollouts
from .whole_groups import WholeGroups
from .phase_timer import PhaseTimer
from .prompt_stream import next_prompts
from .scored_rows import Samples
from .answer_rows import AnswerGenerator
from .state import PPOState


class Schedule(Protocol):
    """Which groups an iteration hands on: sample(state, seed, timer) -> (Samples | None, metrics),
    the scored groups (None: none complete yet) and the schedule's metrics; close(): what it keeps
    open across iterations, closed at the run's end."""

    def sample(self, state: PPOState, seed: int,
               timer: PhaseTimer) -> tuple[Optional[Samples], dict]: ...

    def close(self) -> None: ...


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
            spec = distributed.all_reduce_sum(self.models.actor.take_speculation(),
                                              self.models.ranks)
            metrics.update({f"spec/{k}": v for k, v in spec.items()})
        return samples, metrics

    def close(self) -> None:
        """What the schedule keeps open (partial rollouts' environments in flight)."""
        self.schedule.close()


def build_sampler(cfg: PPOConfig, models: PPOModels, prompts: list[PromptRow],
                  agents: Optional[Agents]) -> Sampler:
    """The run's sampler: multi-turn trajectories with `agents` (rollout.tools or
    rollout.environment: agent_rows.build_agents), else single-turn answers; partial rollouts
    with rollout.partial_rollouts, else whole groups; prompts drawn from `prompts` in the seeded
    stream of prompt_stream.py."""
    rollout = cfg.rollout

    def draw(state: PPOState, count: int) -> list[PromptRow]:
        return next_prompts(prompts, count, cfg.seed, state, models.ranks)
    score = Scoring.of(cfg, models)
    if rollout.partial_rollouts:
        carried = None if agents is None else CarriedTrajectories(
            models.actor.run, agents.renderer, agents.source,
            sampling_params(rollout, n=rollout.samples_per_prompt), agents.limits,
            models.actor.max_model_len)
        schedule = PartialRollouts(models, draw, score, rollout, carried, prompts)
    else:
        rows = (AnswerGenerator(models, rollout) if agents is None
                else TrajectoryGenerator(models, agents, rollout))
        schedule = WholeGroups(rows, draw, score, cfg, models.ranks)
    return Sampler(models, schedule, bool(rollout.speculative_tokens))
