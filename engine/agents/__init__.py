"""Agents: multi-turn rollouts with tools and environments (docs/agents.md).

`run_agents(llm, ChatRenderer(tokenizer, schemas), EnvSource(...), rows, params, limits)`
samples trajectories whose turns alternate between the model and an environment (environment.py's
protocol, or `ToolEnvironment` answering the model's tool calls), token in, token out: a thin
wrapper over `CarriedTrajectories`, which continues them (typed engine/inference/in_flight.py
samples) across engine runs, their environments alive in between (partial rollouts), or runs them
to their end (whole groups).

carried.py's names load on first use: it imports torch, and an environment's worker process
(`python -m` env_worker.py, a module of this package, one per trajectory) runs this file first;
the rest of the package is torch-free.
"""
from .chat_render import ChatRenderer
from .environment import EnvironmentFailure, load_environment
from .agent_loop import AgentLimits, AgentTrajectory, agent_metrics
from .sources import EnvSource
from .tool_calls import ToolCall, parse_hermes, parser_for
from .tools import ToolEnvironment, load_tools, tool_schema

__all__ = ["CarriedTrajectories", "ChatRenderer", "EnvironmentFailure", "load_environment",
           "AgentLimits", "EnvSource",
           "AgentTrajectory",
           "agent_metrics", "run_agents", "ToolCall", "parse_hermes", "parser_for",
           "ToolEnvironment",
           "load_tools", "tool_schema"]


def __getattr__(name: str):
    if name in ("CarriedTrajectories", "run_agents"):
        from . import carried
        return getattr(carried, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
