"""Importing a user's 'module:name' (tools, environments), with one-line errors naming the
option."""
from __future__ import annotations

import importlib
import os
import sys

from ..errors import FusedRLError, UsageError


def load_object(spec: str, option: str):
    """'package.module:name' -> the object; `option` (e.g. 'rollout.tools') names it in errors.
    Modules are looked up in the current directory first, then on sys.path."""
    module, sep, name = spec.partition(":")
    if not (sep and module and name):
        raise UsageError(f"{option}={spec!r}: expected 'module:name'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise UsageError(
            f"{option}={spec!r}: cannot import {module!r} ({e}); modules are looked up in "
            "the current directory and on PYTHONPATH") from None
    except (Exception, SystemExit) as e:  # the user's module failed (or exited) while importing
        raise FusedRLError(
            f"{option}={spec!r}: importing {module!r} raised {type(e).__name__}: {e}") from e
    if not hasattr(found, name):
        raise UsageError(f"{option}={spec!r}: {getattr(found, '__file__', module)} has no {name!r}")
    return getattr(found, name)
