"""The first half of a multi-turn iteration (rollout.tools or rollout.environment): n trajectories
per prompt row, each with its own environment (engine/agents), packed with only the model's tokens
as targets (the environment's are context: no loss, KL or entropy on them) and scored by the
environment's rewards, plus the run's reward functions or reward model where set (generated.py,
as every mode's rows).

Rows are ordered prompt by prompt, sample by sample, so rows g*n .. g*n + n - 1 are group g: a
GRPO group is the n trajectories of one initial prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ...agents import (AgentLimits, ChatRenderer, ToolEnvironment, agent_metrics, load_environment,
                       load_tools, parser_for, run_agents, tool_schema)
from ...config.ppo import RolloutConfig
from ...inference.sampling_params import SamplingParams
from .generated import Generated, score_generated
from .models import PPOModels
from .phase_timer import PhaseTimer
from .samples import Samples


@dataclass(frozen=True)
class Agents:
    """A run's multi-turn setup: the template renderer (with the tools' schemas), the environment of
    one trajectory made from its row's columns, and the limits."""
    renderer: ChatRenderer
    make_env: Callable[[dict], object]
    limits: AgentLimits


def build_agents(r: RolloutConfig, tokenizer) -> Optional[Agents]:
    """The Agents of rollout.tools / rollout.environment (None for single-turn runs); every tool,
    the environment class and the template's tool format are checked here, before any model
    loads."""
    if not r.multi_turn:
        return None
    limits = AgentLimits(r.max_turns, r.max_trajectory_tokens, r.env_timeout_s, r.env_errors)
    if r.environment:
        cls = load_environment(r.environment)
        return Agents(ChatRenderer(tokenizer), lambda row: cls(**row), limits)
    tools = load_tools(r.tools)
    parse = parser_for(tokenizer)
    renderer = ChatRenderer(tokenizer, [tool_schema(fn) for fn in tools.values()])
    return Agents(renderer, lambda row: ToolEnvironment(tools, parse, row["prompt"]), limits)


def sample_trajectories(models: PPOModels, agents: Agents, sources: list, r: RolloutConfig,
                        seed: int, timer: PhaseTimer, share_prompts: bool = False,
                        turn_gamma: float | None = None) -> tuple[Samples, dict]:
    """r.samples_per_prompt trajectories per prompt row (data/prompts.py PromptRow) from the
    policy's current weights, scored as every mode's rows are (generated.py: share_prompts,
    turn_gamma there); returns the samples and the agents' metrics. A trajectory that ended on an
    environment's error has no environment reward."""
    params = SamplingParams(n=r.samples_per_prompt, temperature=r.temperature, top_k=r.top_k,
                            top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=seed)
    rows = [{"prompt": source.prompt, **source.columns} for source in sources]
    with timer.phase("generate"):
        trajectories = run_agents(models.actor.generate_turns, agents.renderer, agents.make_env,
                                  rows, params, agents.limits)
    tokens = [t.tokens for t in trajectories]
    logprobs = models.actor.llm.device_logprobs([s for t in tokens for s in t.logprob_slots])
    generated = Generated([t.prompt_token_ids for t in tokens], [t.token_ids for t in tokens],
                          logprobs, r.samples_per_prompt, sources,
                          [t.model_mask for t in tokens],
                          [[] if t.error else list(t.turn_rewards) for t in trajectories])
    samples = score_generated(models, generated, r, timer, share_prompts, turn_gamma)
    return samples, agent_metrics(trajectories)
