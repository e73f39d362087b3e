"""Where a trajectory's environment comes from, as plain data: a worker process (env_worker.py)
makes the same environment from it as the trainer would (`rollout.environment=module:Class`, or
`ToolEnvironment` over `rollout.tools=module:function,...`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EnvSource:
    """environment: 'module:Class' (None: the tools' environment); tools: 'module:function' specs
    and schemas, {name: JSON schema} of each (checked by the trainer, which made them)."""
    environment: str | None = None
    tools: tuple[str, ...] = ()
    schemas: dict | None = None

    @property
    def name(self) -> str:
        return (f"rollout.environment={self.environment}" if self.environment
                else f"rollout.tools={','.join(self.tools)}")

    def loader(self):
        """A function row -> a fresh environment, its class or tools loaded (and checked) now."""
        if self.environment:
            from .environment import load_environment
            cls = load_environment(self.environment)
            return lambda row: cls(**row)
        from .loading import load_object
        from .tool_calls import parse_hermes
        from .tools import ToolEnvironment
        tools = {fn.__name__: fn for fn in (load_object(s, "rollout.tools") for s in self.tools)}
        return lambda row: ToolEnvironment(tools, parse_hermes, row["prompt"], self.schemas)
