"""One reward function: where it is loaded from, how it is called, and what it must return.

A function is named by a spec `module:function` (reward_fn), the module a dotted name looked up in
the directory the run started in, then on PYTHONPATH, or a `.py` file's path; or it is passed to
`fusedrl.engine.run_ppo` as a callable. Where it comes from is fixed once, at start
(`FunctionSource`: absolute paths), so a function that changes directory later finds the same
module again.

It is called on a batch of rows in one of two forms, chosen by its signature (`calling_style`):
- TRL's keywords, when it names `completions` or takes **kwargs: fn(prompts=, completions=,
  completion_ids=, **columns), prompts and completions in the dataset's form (strings, or message
  lists where the prompt is one), each other column of the rows a keyword list;
- positional, `fn(prompt_texts, response_texts)`: the decoded texts.
An `async def` function is awaited on an event loop of its own, kept across calls (a client bound
to the loop stays usable). It returns one real number, or None ("does not apply to this row", as in
TRL), per row; anything else is a `RewardFunctionError` naming the function, as is any exception
it raises (SystemExit and KeyboardInterrupt included). NaN and inf are numbers here: the rollout
drops their rows (engine/stages/ppo/advantages.py `finite_rows`).
Torch-free: a worker process imports this module and the user's, nothing heavier.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import numbers
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ...errors import FusedRLError, UsageError


class RewardFunctionError(FusedRLError):
    """A reward function raised, hung, died, or returned something other than one score per row."""


@dataclass(frozen=True)
class FunctionSource:
    """Where a reward function comes from, with every path absolute: `module` (a dotted name found
    first in `search_dir`, or a .py file's path) and `function`, or the callable `fn` itself.
    `name` names it in errors: the spec, or the callable's module.qualname."""
    name: str
    module: Optional[str] = None
    function: Optional[str] = None
    search_dir: Optional[str] = None
    fn: Optional[Callable] = None

    @property
    def short_name(self) -> str:
        """The function's own name (its metrics' NAME in `rewards/NAME/mean`)."""
        return self.function or getattr(self.fn, "__name__", self.name)


def source_of(spec) -> FunctionSource:
    """The FunctionSource of a spec 'module:function' or 'path/to/file.py:function' (the file and
    the current directory made absolute now), or of a callable."""
    if callable(spec):
        qualname = getattr(spec, "__qualname__", repr(spec))
        return FunctionSource(f"{getattr(spec, '__module__', '?')}.{qualname}", fn=spec)
    module, sep, name = str(spec).rpartition(":")
    if not (sep and module and name):
        raise UsageError(f"reward_fn={spec!r}: expected 'module:function' "
                         "(or 'path/to/file.py:function')")
    if module.endswith(".py"):
        path = Path(module).expanduser().resolve()
        if not path.is_file():
            raise UsageError(f"reward_fn={spec!r}: {path} is not a file")
        return FunctionSource(spec, str(path), name)
    return FunctionSource(spec, module, name, search_dir=os.getcwd())


def load_function(source: FunctionSource) -> Callable:
    """Import the function of `source` (a usage error when it cannot be found; a failure when its
    module raises or exits while importing)."""
    if source.fn is not None:
        return source.fn
    spec = f"reward_fn={source.name!r}"
    try:
        module = _import(source)
    except ModuleNotFoundError as e:
        raise UsageError(f"{spec}: cannot import {source.module!r} ({e}); modules are looked up "
                         "in the directory the run started in and on PYTHONPATH") from None
    except (Exception, SystemExit) as e:  # the user's module failed (or exited) while importing
        raise FusedRLError(f"{spec}: importing {source.module!r} raised "
                           f"{type(e).__name__}: {e}") from e
    fn = getattr(module, source.function, None)
    if not callable(fn):
        where = getattr(module, "__file__", source.module)
        raise UsageError(f"{spec}: {where} has no function {source.function!r}")
    return fn


def _import(source: FunctionSource):
    """The module of `source`: a dotted name found in source.search_dir first (as `python -m`
    would; the `fusedrl` script's own sys.path does not hold the current directory), or a `.py`
    file run as a module of its own (file_module)."""
    if source.module.endswith(".py"):
        return file_module(Path(source.module))
    if source.search_dir not in sys.path:
        sys.path.insert(0, source.search_dir)
    return importlib.import_module(source.module)


def file_module(path: Path):
    """A `.py` file executed as a module under a name no other module has (`fusedrl_reward_` + its
    stem + a hash of its path), once per process: a file named like one of the process's modules
    (json.py, utils.py) must not take that module's place in sys.modules, where dataclasses and
    pickling look a class's module up. Its directory comes first on sys.path while it runs, so its
    top-level imports find the modules beside it as a script's would; after, that directory is
    looked in last (imports inside its functions still find them, and shadow nothing)."""
    name = f"fusedrl_reward_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    folder = str(path.parent)
    found = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module
    sys.path.insert(0, folder)
    try:
        found.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.path.remove(folder)
    if folder not in sys.path:
        sys.path.append(folder)
    return module


@dataclass
class RewardInputs:
    """The R rows one call scores, in the forms a reward function is called with."""
    prompts: list                       # [R] the dataset's prompt: a string or a message list
    prompt_texts: list[str]             # [R] the prompt the policy read, decoded
    completion_texts: list[str]         # [R] the response, decoded
    completion_ids: list[list[int]]     # [R] the response's token ids
    columns: dict[str, list] = field(default_factory=dict)  # the rows' other columns, [R] each
    # [R] a multi-turn trajectory's messages after its opening, each with its role (None: one turn)
    completion_messages: Optional[list[list[dict]]] = None

    def completions(self) -> list:
        """[R] TRL's completions: the text, or [{"role": "assistant", "content": text}] where the
        row's prompt is a message list; a multi-turn trajectory's messages after its opening."""
        if self.completion_messages is not None:
            return self.completion_messages
        return [[{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
                for prompt, text in zip(self.prompts, self.completion_texts)]

    def keywords(self) -> dict:
        """TRL's keyword arguments: each column, then prompts, completions and completion_ids."""
        return {**self.columns, "prompts": self.prompts, "completions": self.completions(),
                "completion_ids": self.completion_ids}


def calling_style(fn: Callable) -> str:
    """'keywords' (TRL's call) when fn names `completions` or takes **kwargs, else 'positional'."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: the older, positional form
        return "positional"
    if "completions" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return "keywords"
    return "positional"


class RewardCaller:
    """A loaded reward function: `caller(inputs)` -> one float or None per row, checked; every
    failure a RewardFunctionError naming it. Called in the thread or process that contains it."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name, self.style = fn, name, calling_style(fn)
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    def __call__(self, inputs: RewardInputs) -> list:
        try:
            if self.style == "keywords":
                value = self.fn(**self.arguments(inputs))
            else:
                value = self.fn(inputs.prompt_texts, inputs.completion_texts)
            if inspect.isawaitable(value):
                self.loop = self.loop or asyncio.new_event_loop()
                value = self.loop.run_until_complete(value)
        except RewardFunctionError:
            raise
        except BaseException as e:  # SystemExit and the like too: the user's code ends only the run
            raise RewardFunctionError(f"the reward function {self.name} raised "
                                      f"{type(e).__name__}: {e}") from e
        return checked_scores(value, self.name, len(inputs.completion_ids))

    def arguments(self, inputs: RewardInputs) -> dict:
        """The keywords fn takes: all with **kwargs, else those it names; a RewardFunctionError
        naming a required one the rows lack."""
        given = inputs.keywords()
        parameters = inspect.signature(self.fn).parameters
        missing = [n for n, p in parameters.items() if n not in given and p.default is p.empty
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if missing:
            raise RewardFunctionError(
                f"the reward function {self.name} takes {missing[0]!r}, which the prompt rows do "
                f"not have (their columns: {', '.join(inputs.columns) or 'none'})")
        if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            return given
        return {n: v for n, v in given.items() if n in parameters}


def timed_out(name: str, timeout_s: float, rows: int) -> RewardFunctionError:
    """The failure of a call still running after reward.fn_timeout_s."""
    return RewardFunctionError(f"the reward function {name} did not return within reward."
                               f"fn_timeout_s={timeout_s:g} seconds (scoring {rows} responses)")


def checked_scores(values, name: str, count: int) -> list:
    """`values` as floats (None kept: "not applicable to this row") when it is a list or tuple of
    `count` real numbers or None (bools refused); anything else (a string, a tensor, an array, a
    generator, None) is refused, not coerced."""
    if not isinstance(values, (list, tuple)):
        raise RewardFunctionError(f"the reward function {name} returned {_shown(values)}: expected "
                                  f"a list of {count} numbers, one per response")
    if len(values) != count:
        raise RewardFunctionError(f"the reward function {name} returned {len(values)} scores for "
                                  f"{count} responses")
    for i, value in enumerate(values):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise RewardFunctionError(f"the reward function {name} returned {_shown(value)} as "
                                      f"score {i}: expected a number (int or float) or None")
        if isinstance(value, numbers.Integral) and abs(value) > sys.float_info.max:
            raise RewardFunctionError(f"the reward function {name} returned an integer of "
                                      f"{int(value).bit_length()} bits as score {i}: beyond any "
                                      "float; scale its scores down")
    return [None if v is None else float(v) for v in values]


def _shown(value) -> str:
    """A value's type and the start of its repr, for an error line."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"
