"""A tool call's arguments checked against the tool's JSON schema (the one its chat template
shows the model): a missing, unknown or wrong-typed argument is the model's mistake, told to it
as the tool's answer, never a call that crashes the environment."""
from __future__ import annotations

_TYPES = {"integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "string": lambda v: isinstance(v, str),
          "boolean": lambda v: isinstance(v, bool),
          "array": lambda v: isinstance(v, list),
          "object": lambda v: isinstance(v, dict),
          "null": lambda v: v is None}


class BadArguments(ValueError):
    """Arguments that do not fit the tool's schema: the message names the first that does not."""


def check_arguments(arguments: dict, schema: dict) -> None:
    """Raise BadArguments unless `arguments` fit `schema` (a tool's {"type": "function",
    "function": {"name", "parameters": {"properties", "required"}}})."""
    function = schema["function"]
    parameters = function.get("parameters", {})
    properties = parameters.get("properties", {})
    unknown = sorted(set(arguments) - set(properties))
    if unknown:
        raise BadArguments(f"{function['name']} takes no argument {unknown[0]!r} (its arguments: "
                           f"{', '.join(properties) or 'none'})")
    missing = [name for name in parameters.get("required", []) if name not in arguments]
    if missing:
        raise BadArguments(f"{function['name']} needs the argument {missing[0]!r}")
    for name, value in arguments.items():
        problem = _mismatch(value, properties[name])
        if problem:
            raise BadArguments(f"{function['name']}'s argument {name!r} is {_shown(value)}: "
                               f"expected {problem}")


def _mismatch(value, spec: dict) -> str | None:
    """What `value` should have been under the property schema `spec`; None when it fits."""
    if value is None and spec.get("nullable"):
        return None
    kinds = spec.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    if kinds and not any(_TYPES.get(k, lambda v: True)(value) for k in kinds):
        return " or ".join(kinds)
    if "enum" in spec and value not in spec["enum"]:
        return f"one of {spec['enum']}"
    if isinstance(value, list) and isinstance(spec.get("items"), dict):
        for item in value:
            problem = _mismatch(item, spec["items"])
            if problem:
                return f"an array of {problem}"
    return None


def _shown(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"
