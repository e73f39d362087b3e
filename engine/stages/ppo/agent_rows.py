"""Multi-turn rows (rollout.tools or rollout.environment): n trajectories per prompt row, each
with its own environment (engine/agents), handed on as every mode's rows (sampled_rows.py): packed
with only the model's tokens as targets (the environment's are context: no loss, KL or entropy on
them) and scored by the environment's rewards, plus the run's reward functions or reward model
where set. sampler.py samples them in whole groups, with dynamic sampling where asked, run to their
end through the path partial rollouts continue them on (engine/agents/carried.py).

Rows are ordered prompt by prompt, sample by sample, so rows g*n .. g*n + n - 1 are group g: a
GRPO group is the n trajectories of one initial prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...agents import (AgentLimits, CarriedTrajectories, ChatRenderer, EnvSource, agent_metrics,
                       load_environment, load_tools, parser_for, tool_schema)
from ...agents.carried import new_trajectory
from ...config.ppo import RolloutConfig
from .sampled_rows import Generated, sampled_routing, sampling_params
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
        finished turn answered by its environment), to their end: no stop rule."""
        rollout, n = self.rollout, self.rollout.samples_per_prompt
        actor, agents = self.models.actor, self.agents
        carried = CarriedTrajectories(actor.run, agents.renderer, agents.source,
                                      sampling_params(rollout, seed, n), agents.limits,
                                      actor.max_model_len)
        groups = [{"prompt": [], "samples": [new_trajectory(j) for j in range(n)]}
                  for _ in sources]
        rows = [(group, sample) for group in groups for sample in group["samples"]]
        try:
            with timer.phase("generate"):
                carried.open([(group, {"prompt": source.prompt, **source.columns},
                               group["samples"]) for group, source in zip(groups, sources)])
                carried.advance(rows, None)
                trajectories = carried.trajectories(rows)
        finally:
            carried.close()
        self.drawn += trajectories
        # A trajectory that left the batch (env_errors=skip) has no target: nothing of it is
        # trained, and its group's statistics are the others'
        # (advantages.py group_token_advantages).
        masks = [[False] * len(s["mask"]) if t.error else s["mask"]
                 for (_, s), t in zip(rows, trajectories)]
        logprobs = torch.tensor([x for (_, s), t in zip(rows, trajectories) if not t.error
                                 for x in s["logprobs"]], dtype=torch.float32,
                                device=actor.device)
        return Generated([group["prompt"] for group, _ in rows], [s["answer"] for _, s in rows],
                         logprobs, n, sources, masks,
                         [[] if t.error else list(t.turn_rewards) for t in trajectories],
                         trajectories, sampled_routing(self.models))

    def take_metrics(self) -> dict:
        """The agents' metrics (engine/agents agent_metrics) of every trajectory since the last
        call (each round of dynamic sampling); starts counting again."""
        drawn, self.drawn = self.drawn, []
        return agent_metrics(drawn)
