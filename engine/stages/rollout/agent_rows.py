"""Multi-turn rows (rollout.tools or rollout.environment): n trajectories per prompt row, each
with its own environment (engine/agents), handed on as every mode's rows (sampled_rows.py): packed
with only the model's tokens as targets (the environment's are context: no loss, KL or entropy on
them) and scored by the environment's rewards, plus the run's reward functions or reward model
where set. whole groups run them to their end through the path partial rollouts continue them on
(engine/agents/carried.py).

Rows are ordered prompt by prompt, sample by sample, so rows g*n .. g*n + n - 1 are group g: a
GRPO group is the n trajectories of one initial prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...agents import (AgentLimits, CarriedTrajectories, ChatRenderer, EnvSource, agent_metrics,
                       load_environment, load_tools, parser_for, tool_schema)
from ...inference.in_flight import Group
from ...config.ppo import RolloutConfig
from .rows import advance_rows, generated_of
from .sampled_rows import Generated, sampling_params
from .models import PPOModels
from .phase_timer import PhaseTimer


@dataclass(frozen=True)
class Agents:
    """A run's multi-turn setup: the template renderer (with the tools' schemas), where a
    trajectory's environment comes from (made from its row's columns), and the limits."""
    renderer: ChatRenderer
    source: EnvSource
    limits: AgentLimits


def build_agents(rollout: RolloutConfig, tokenizer) -> Optional[Agents]:
    """The Agents of rollout.tools / rollout.environment (None for single-turn runs); every tool,
    the environment class and the template's tool format are checked here, before any model
    loads."""
    if not rollout.multi_turn:
        return None
    limits = AgentLimits(rollout.max_turns, rollout.max_trajectory_tokens, rollout.env_timeout_s,
                         rollout.env_errors, rollout.max_observation_chars,
                         rollout.env_isolation)
    if rollout.environment:
        load_environment(rollout.environment)  # refused now, not in a worker at the first rollout
        return Agents(ChatRenderer(tokenizer), EnvSource(rollout.environment), limits)
    tools = load_tools(rollout.tools)
    parser_for(tokenizer)
    schemas = {name: tool_schema(fn) for name, fn in tools.items()}
    renderer = ChatRenderer(tokenizer, list(schemas.values()))
    return Agents(renderer, EnvSource(tools=tuple(rollout.tools), schemas=schemas), limits)


class TrajectoryGenerator:
    """rollout.samples_per_prompt multi-turn trajectories per prompt row from the policy's current
    weights, each with its own environment (`agents`). A trajectory that ended on an environment's
    error has no environment reward and no target."""

    def __init__(self, models: PPOModels, agents: Agents, rollout: RolloutConfig):
        self.models, self.agents, self.rollout = models, agents, rollout
        self.drawn: list = []  # the trajectories since take_metrics(), for their metrics

    def generate(self, sources: list, seed: int, timer: PhaseTimer) -> Generated:
        """The trajectories of these prompt rows (data/prompts.py PromptRow: the prompt and the
        columns the environment is made from); `seed` fixes the sampling; timed as "generate".
        They run as partial rollouts' do (engine/agents/carried.py: the engine's one loop, each
        finished turn answered by its environment), to their end: no stop rule. A trajectory
        that left the batch (env_errors=skip) has no target: nothing of it is trained, and its
        group's statistics are the others' (group_advantages.py)."""
        rollout, n = self.rollout, self.rollout.samples_per_prompt
        actor, agents = self.models.actor, self.agents
        carried = CarriedTrajectories(actor.run, agents.renderer, agents.source,
                                      sampling_params(rollout, seed, n), agents.limits,
                                      actor.max_model_len)
        groups = [Group.new([], n, source=source, multi_turn=True) for source in sources]
        rows = [(group, sample) for group in groups for sample in group.samples]
        try:
            with timer.phase("generate"):
                carried.open([(group, {"prompt": source.prompt, **source.columns},
                               group.samples) for group, source in zip(groups, sources)])
                advance_rows(self.models, rows, carried.advance, None, 0)
                trajectories = carried.trajectories(rows)
        finally:
            carried.close()
        self.drawn += trajectories
        return generated_of(groups, n, actor.device, trajectories)

    def take_metrics(self) -> dict:
        """The agents' metrics (engine/agents agent_metrics) of every trajectory since the last
        call (each round of dynamic sampling); starts counting again."""
        drawn, self.drawn = self.drawn, []
        return agent_metrics(drawn)
