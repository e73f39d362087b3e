"""Tool calls in the model family's own format, parsed from the text of an assistant turn.

Hermes / Qwen (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call) is
the format of Qwen2.5/Qwen3, Hermes and most open chat templates that take `tools`; the parser is
chosen from the tokenizer's chat template, and a template with no known format is refused in one
line when tools are asked for.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

from ..errors import UsageError

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for: a tool's name and its keyword arguments."""
    name: str
    arguments: dict


class MalformedToolCall(ValueError):
    """A tool-call block that is not {"name": str, "arguments": object}: told to the model as the
    tool's answer, so it can try again (a model error, not the environment's)."""


def parse_hermes(text: str) -> list[ToolCall]:
    """Every `<tool_call>...</tool_call>` block of `text`, in order ([] when there is none)."""
    calls = []
    for block in _HERMES.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError as e:
            raise MalformedToolCall(
                f"the tool call {block[:200]!r} is not JSON ({e.msg})") from None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                and isinstance(call.get("arguments", {}), dict)):
            raise MalformedToolCall(
                f'the tool call {block[:200]!r} is not {{"name": str, "arguments": '
                "object}")
        calls.append(ToolCall(call["name"], call.get("arguments", {})))
    return calls


def parser_for(tokenizer) -> Callable[[str], list[ToolCall]]:
    """The tool-call parser of this tokenizer's chat template."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):  # several named templates: the default one's format
        template = dict(template).get("default", "") if template else ""
    if "<tool_call>" in template:
        return parse_hermes
    raise UsageError(
        "rollout.tools: the tokenizer's chat template has no tool-call format this engine "
        "parses (Hermes/Qwen '<tool_call>' blocks); use a model whose template takes tools")
