"""How config dataclasses declare their options: a default (or factory) with its help text, and
one-line validation errors. Every config module uses these; `fusedrl <stage> --help` shows
the help text (engine/config/io.py)."""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import field


def option(text: str, default=None, factory=None):
    """A dataclass field with help text `text` and a default value (or a default factory)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def check(ok: bool, message: str) -> None:
    """Raise ValueError(message) unless `ok`: the one-line error of a field's validation."""
    if not ok:
        raise ValueError(message)


def choices(tp) -> tuple | None:
    """The allowed values of a `Literal[...]` type hint (also inside `X | None`), else None."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    inner = [choices(a) for a in typing.get_args(tp)]
    return next((c for c in inner if c), None)


def check_fields(config, section: str = "") -> None:
    """Validate what every option of dataclass `config` shares (also when built from Python, where
    no YAML reader ran): a `Literal` field holds one of its choices, a float field a finite number
    (each option has an off value of its own, so infinity never means "unlimited"). A one-line error
    naming `section.field`, the value and what was expected."""
    for name, allowed in _field_choices(type(config)):
        value = getattr(config, name)
        if allowed and value is not None and value not in allowed:
            raise ValueError(f"{section}{name} must be one of {allowed}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{section}{name} must be a finite number, got {value}")


@functools.lru_cache(maxsize=None)
def _field_choices(config_cls: type) -> tuple[tuple[str, tuple | None], ...]:
    """(name, choices or None) of each field of dataclass `config_cls`, once a class: resolving the
    string annotations (get_type_hints) costs far more than the checks, and every config built (the
    parser's help included) runs them."""
    hints = typing.get_type_hints(config_cls)
    return tuple((f.name, choices(hints[f.name])) for f in dataclasses.fields(config_cls))
