"""Tools: plain Python functions with type hints and a Google-style docstring, offered to the model
through its chat template (their JSON schemas, transformers' `get_json_schema`) and called when
the model asks, one `tool` message per call. `ToolEnvironment` is the environment that a run with
`rollout.tools` and no `rollout.environment` uses: each assistant turn's tool calls are run and
answered; a turn with no call is the final answer and ends the trajectory.
"""
from __future__ import annotations

import json
from typing import Callable, Sequence

from ..errors import UsageError
from .loading import load_object
from .tool_arguments import BadArguments, check_arguments
from .tool_calls import MalformedToolCall, ToolCall

# A tool's result enters the conversation as prompt tokens: bounded like any observation.
RESULT_CHARS = 4000


def load_tools(specs: Sequence[str], option: str = "rollout.tools") -> dict[str, Callable]:
    """'module:function' specs -> {function name: function}, each with a valid JSON schema;
    `option` names the specs in errors."""
    tools = {}
    for spec in specs:
        fn = load_object(spec, option)
        if not callable(fn):
            raise UsageError(f"{option}={spec!r} is not a function")
        if fn.__name__ in tools:
            raise UsageError(f"{option}: two tools are named {fn.__name__!r}")
        tool_schema(fn, option)  # refused now, not at the first rollout
        tools[fn.__name__] = fn
    return tools


def tool_schema(fn: Callable, option: str = "rollout.tools") -> dict:
    """The function's JSON schema as chat templates take it ({"type": "function", "function":
    ...}); `option` names the tool's spec in errors."""
    from transformers.utils import get_json_schema
    try:
        return get_json_schema(fn)
    except Exception as e:  # transformers' DocstringParsingException / TypeHintParsingException
        raise UsageError(
            f"{option}: {fn.__module__}:{fn.__name__} has no usable schema ({e}); a tool "
            "needs type hints and a docstring with an Args: section") from None


class ToolEnvironment:
    """Answers each assistant turn's tool calls; a turn without one ends the trajectory (reward 0
    from here: the run's reward functions score the final answer). `prompt`: the row's, a string or
    a message list, which opens the conversation. schemas: {name: the tool's JSON schema} (None:
    tool_schema of each): a call's arguments are checked against it before the call."""

    def __init__(self, tools: dict[str, Callable], parse: Callable[[str], list[ToolCall]], prompt,
                 schemas: dict[str, dict] | None = None):
        self.tools, self.parse, self.prompt = tools, parse, prompt
        self.schemas = schemas or {name: tool_schema(fn) for name, fn in tools.items()}

    def reset(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) else \
            list(self.prompt)

    def step(self, assistant_message: dict) -> tuple[list[dict], float, bool]:
        """Run the turn's tool calls: ([tool messages], 0.0, False), or ([], 0.0, True) without
        any."""
        try:
            calls = self.parse(assistant_message["content"])
        except MalformedToolCall as e:
            return [{"role": "tool", "name": "error", "content": f"error: {e}"}], 0.0, False
        if not calls:
            return [], 0.0, True
        return [self._answer(call) for call in calls], 0.0, False

    def _answer(self, call: ToolCall) -> dict:
        fn = self.tools.get(call.name)
        if fn is None:  # named "error": a template may render the name, which the model chose
            content = f"error: no tool named {call.name!r} (tools: {', '.join(sorted(self.tools))})"
            return {"role": "tool", "name": "error", "content": content[:RESULT_CHARS]}
        try:
            check_arguments(call.arguments, self.schemas[call.name])
        except BadArguments as e:  # the model's mistake: told to it, trained as such
            return {"role": "tool", "name": call.name, "content": f"error: {e}"[:RESULT_CHARS]}
        result = fn(**call.arguments)  # an exception ends the trajectory (rollout.env_errors)
        content = result if isinstance(result, str) else json.dumps(result, default=str)
        return {"role": "tool", "name": call.name, "content": content[:RESULT_CHARS]}
