"""The paths a run names, fixed once at its start: every input (model directories, data files, the
reward function's module) made absolute and output_dir resolved to the directory it leads to, before
any of the user's code runs (a reward module's import, a reward function that changes directory),
so nothing the run writes or reads later depends on the current directory, and a symbolic link
given as output_dir is checked, locked and written where it leads, never through.

`run_inputs` lists what a run reads, for run_dir.py to protect: the run is refused when its
output directory is or holds one of them, so train.overwrite=true never deletes an input.
Torch-free: the command line runs it before importing torch.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path


def pinned(config):
    """A copy of the stage config `config` (a dataclass with `output_dir`, and `paths()` for a
    training stage) with its inputs absolute and output_dir the real path it leads to."""
    models, files = config.paths() if hasattr(config, "paths") else ({}, {})
    for option, path in {**models, **files}.items():
        if path:
            config = _replaced(config, option, os.path.abspath(path))
    return dataclasses.replace(config, output_dir=os.path.realpath(config.output_dir))


def _replaced(config, option: str, value):
    """`config` with the dotted option (`data.train_file`) set to `value`, validated again."""
    head, _, rest = option.partition(".")
    value = _replaced(getattr(config, head), rest, value) if rest else value
    return dataclasses.replace(config, **{head: value})


def path_options(config) -> set[str]:
    """The dotted names of `config`'s path options (`model`, `data.train_file`, ...)."""
    models, files = config.paths() if hasattr(config, "paths") else ({}, {})
    return {*models, *files}


def run_inputs(config, config_file=None) -> list[str]:
    """Every file and directory the run of `config` reads: its models (with their tokenizers), data
    files, the reward functions' modules (`reward_fn`) and the YAML it was read from."""
    models, files = config.paths() if hasattr(config, "paths") else ({}, {})
    specs = config.reward_fns() if hasattr(config, "reward_fns") else ()
    modules = [module_file(spec) for spec in specs]
    return [p for p in (*models.values(), *files.values(), *modules, config_file) if p]


def module_file(spec: str) -> str | None:
    """The file of the module of 'package.module:function', found as importlib would (the current
    directory first, then sys.path) but without importing anything (a package's __init__ is user
    code), or of 'path/to/file.py:function'; None when it is not a file on those paths (importing
    it names the problem)."""
    module = spec.rpartition(":")[0]
    if module.endswith(".py"):  # a file's path: reward_fn=path/to/file.py:function
        return str(Path(module).absolute()) if Path(module).is_file() else None
    if not module or not all(part.isidentifier() for part in module.split(".")):
        return None
    relative = Path(*module.split("."))
    for root in [os.getcwd(), *sys.path]:
        for candidate in (relative.with_suffix(".py"), relative / "__init__.py"):
            path = Path(root or ".") / candidate
            if path.is_file():
                return str(path.absolute())
    return None
