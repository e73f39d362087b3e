"""Config dataclasses in and out: from nested dicts (YAML), `key=value` overrides, help text.
Torch-free.

Any dataclass works; its fields carry `metadata={"help": ...}`. Nested dataclass fields become
sections (`optim.lr=1e-4`); the keys given for a section are set on the command's own default of
that section (GRPOConfig's `ppo` default, not UpdateConfig's), so one key changes one option.
Unknown keys and values of the wrong type are rejected with the dotted key, the expected type and a
did-you-mean: our name for an option of transformers / TRL / torchtune (config/aliases.py), else
the closest spelling. Nothing here holds state.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml

from ..errors import UsageError
from .aliases import meaning_of
from .fields import choices


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclass."""


class Loadable:
    """What a stage's config class offers a Python caller: construction from a dict or a YAML file
    (with `key=value` overrides), as the command line builds it."""

    @classmethod
    def from_dict(cls, data: dict, overrides: list[str] = ()):
        """The config from nested dict `data` ({"optim": {"lr": 1e-5}}) and `key=value`
        overrides."""
        return from_dict(cls, apply_overrides(data, list(overrides)))

    @classmethod
    def from_yaml(cls, path, overrides: list[str] = ()):
        """The config from YAML file `path` and `key=value` overrides (they win)."""
        return load(cls, path, overrides)


def from_dict(cls, data: dict, prefix: str = "", root=None):
    """Build dataclass `cls` (the section `prefix` of config `root`, by default itself) from a
    (nested) dict; missing keys keep their defaults."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got "
            f"{type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                "unknown config key "
                f"'{prefix}{key}'{_did_you_mean(root or cls, fields, prefix, str(key))}; known "
                f"keys: {', '.join(fields)}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, (dict, type(None))):
            value = _merged(_section_default(fields[key]), value or {})
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}", root or cls)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field left out
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def _field_default(f: dataclasses.Field):
    """The default value of field `f` (its factory's product), or dataclasses.MISSING."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _section_default(f: dataclasses.Field) -> dict:
    """The default of section field `f` as a dict ({} when it has none: the section class's
    defaults)."""
    default = _field_default(f)
    return to_dict(default) if dataclasses.is_dataclass(default) else {}


def _merged(base: dict, over: dict) -> dict:
    """`over`'s keys set on a copy of `base`, section by section (a section given as a mapping
    keeps base's other keys; anything else replaces)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = (_merged(base[key], value)
                    if isinstance(value, dict) and isinstance(base.get(key), dict)
                    else value)
    return out


def _did_you_mean(root, fields, prefix: str, key: str) -> str:
    """' (did you mean ...?)' for an unknown `prefix + key`: our name for the option by meaning
    (anywhere in `root`), else the closest spelling among the section's `fields`, else the option of
    that name (or the closest spelling) in another section (`lr` -> optim.lr, `optim.max_steps` ->
    train.max_steps); '' for none."""
    meant = meaning_of(root, f"{prefix}{key}")
    if meant:
        ours, note = meant
        return f" (did you mean '{ours}'?{f' {note}' if note else ''})"
    leaves = {}  # last part -> the first dotted option of `root` ending in it
    for dotted in dotted_keys(root):
        leaves.setdefault(dotted.rsplit(".", 1)[-1], dotted)
    if key in leaves:
        return f" (did you mean '{leaves[key]}'?)"
    close = difflib.get_close_matches(key, fields, n=1)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    close = difflib.get_close_matches(key, list(leaves), n=1)
    return f" (did you mean '{leaves[close[0]]}'?)" if close else ""


def dotted_keys(cls, prefix: str = "") -> list[str]:
    """Every option of config dataclass `cls` as a dotted key, in field order."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += dotted_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _coerce(tp, value, key: str, root):
    """Check `value` against type hint `tp` (int, float, bool, str, Literal[...], X | None, list[X],
    or a dataclass of config `root`)."""
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, f"{key}.", root)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: expected one of {args}, got {value!r}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for tp_ in inner[:-1]:  # X | Y: the first type that takes the value (int before float)
            try:
                return _coerce(tp_, value, key, root)
            except ConfigError:
                pass
        try:
            return _coerce(inner[-1], value, key, root)
        except ConfigError:
            if len(inner) == 1:
                raise
        names = " or ".join(getattr(a, "__name__", str(a)) for a in inner)
        raise ConfigError(f"{key}: expected {names}, got {value!r} ({type(value).__name__})")
    if origin is list:  # a YAML list, or one comma-separated text (the command line's form)
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list):
            # A lone item is a list of one (reward.weights=1.0 for one reward function), as the
            # comma-separated text of one item is; anything else is not a list.
            try:
                return [_coerce(args[0], value, key, root)]
            except ConfigError:
                raise ConfigError(f"{key}: expected a list (or comma-separated text), got "
                                  f"{value!r}") from None
        return [_coerce(args[0], item, f"{key}[{i}]", root) for i, item in enumerate(value)]
    if tp is float and isinstance(value, str):
        value = _float_or_text(value)
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[tp]
    if not ok(value):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return float(value) if tp is float else value


def _float_or_text(text: str):
    """PyYAML (YAML 1.1) reads `1e-4` as a string (it wants `1.0e-4`); accept it for float
    fields."""
    try:
        return float(text)
    except ValueError:
        return text


def to_dict(config) -> dict:
    """The config as plain nested dicts (what `from_dict` reads back)."""
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set `a.b=value` pairs in a copy of nested dict `data`; values are parsed as YAML scalars."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        value = _parse_yaml(text, f"override {key}:") if text else ""
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = value
    return data


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def load(cls, path=None, overrides: list[str] = (), fill: dict | None = None):
    """`cls` from an optional YAML file plus `key=value` overrides (overrides win); `fill`: {dotted
    key: text} set where the file and the overrides leave that key empty."""
    data = apply_overrides({} if path is None else read_yaml(path), list(overrides))
    missing = [f"{key}={text}" for key, text in (fill or {}).items() if not _has(data, key)]
    data = apply_overrides(data, missing)
    return from_dict(cls, data)


def _has(data: dict, dotted: str) -> bool:
    """Whether nested dict `data` holds a non-empty value at `dotted`."""
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return bool(node)


def command_config(cls, path, overrides: list[str], fill: dict | None = None):
    """`load` for a command (every fusedrl command reads its config so): a bad file, key or value is
    a one-line UsageError naming it. A key the overrides set twice takes the last (a wrapper
    script's defaults, then the user's own)."""
    try:
        return load(cls, path, overrides, fill)
    except OSError as e:
        raise UsageError(f"--config {path}: {e.strerror}") from e
    except ValueError as e:  # ConfigError is a ValueError, as are the dataclasses' checks
        raise UsageError(str(e)) from e


def print_config(config) -> int:
    """--print-config: the resolved config (file, overrides and the command's defaults) as YAML."""
    print(to_yaml(config), end="")
    return 0


OPTIONS_EPILOG = """options (YAML keys; nested sections as dotted overrides, e.g. optim.lr=2e-5):
{options}

Values are YAML scalars: 1e-4, true, null, "a string". Overrides win over the file."""


def options_epilog(cls) -> str:
    """A command's --help epilog: every option of config class `cls` (describe)."""
    return OPTIONS_EPILOG.format(options="\n".join(describe(cls)))


def read_yaml(path) -> dict:
    """The mapping of keys in YAML file `path` ({} for an empty file); ConfigError for bytes that
    are not UTF-8, invalid YAML, nesting deeper than MAX_YAML_DEPTH, or a top level that is not a
    mapping."""
    data = _parse_yaml(_utf8_text(path), f"{path}:")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of keys (key: value lines), got a YAML "
            f"{type(data).__name__}")
    return data


def _utf8_text(path) -> str:
    """The text of file `path`; ConfigError naming the file, line and column of the first byte that
    is not UTF-8 (the decoder's own message names neither the file nor the line)."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, line_start = raw.count(b"\n", 0, e.start) + 1, raw.rfind(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                          f"{e.start - line_start + 1}); a config file is UTF-8 text") from None


MAX_YAML_DEPTH = 100  # a config nests 2-3 levels; Python's recursion limit would allow ~300


class _DepthLimitedLoader(yaml.SafeLoader):
    """safe_load's loader, stopped at MAX_YAML_DEPTH nested nodes while it reads them: PyYAML's
    scanner checks every open bracket at each token, so reaching the recursion limit took seconds
    (2-7 s for 20000 '[' on 2 cores) before the refusal."""

    def compose_node(self, parent, index):
        self.depth = getattr(self, "depth", 0) + 1
        if self.depth > MAX_YAML_DEPTH:
            raise RecursionError(f"YAML nested deeper than {MAX_YAML_DEPTH}")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        """A mapping whose key is written twice is refused at the second (YAML would keep the last
        in silence: `optim: {lr: 1e-4, lr: 2e-4}` trains at one of them without a word). A key
        that a merge (`<<: *base`) brings in may still be overridden."""
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            if (key_node.tag, key_node.value) in seen:
                raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: key "
                                     f"{key_node.value!r} written twice in one mapping")
            seen.add((key_node.tag, key_node.value))
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, where: str):
    """YAML `text` as Python values; ConfigError starting with `where` when it is not YAML or is
    nested deeper than MAX_YAML_DEPTH (or Python's recursion limit)."""
    try:
        return yaml.load(text, Loader=_DepthLimitedLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{where} nested too deeply to be a config") from None


def to_yaml(config) -> str:
    """The config as YAML text, in field order (what `load` reads back)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_yaml(config, path):
    Path(path).write_text(to_yaml(config), encoding="utf-8")


def describe(cls, prefix: str = "", defaults=None) -> list[str]:
    """One help line per option of `cls`: dotted key, type, default and help text; a nested section
    first gets a line of its own help (`lora.* (section): ...`), which says what the section is for.
    `defaults`: the instance of `cls` holding the defaults to show (a section's default in the
    command's config: GRPO's `ppo`, not UpdateConfig's); None: the class's own."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = _field_default(f) if defaults is None else getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            lines.append(f"  {prefix}{f.name}.* (section): {f.metadata.get('help', '')}")
            lines += describe(tp, f"{prefix}{f.name}.",
                              default if dataclasses.is_dataclass(default) else None)
            continue
        default = "(required)" if default is dataclasses.MISSING else default
        allowed = choices(tp)
        type_name = ("|".join(map(str, allowed)) if allowed
                     else getattr(tp, "__name__", None) or str(tp).replace("typing.", ""))
        lines.append(
            f"  {prefix}{f.name} ({type_name}, default {default!r}): {f.metadata.get('help', '')}")
    return lines
