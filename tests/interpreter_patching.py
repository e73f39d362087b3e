"""The Triton interpreter without its repeated patching, for the suite's processes (tests/conftest.py,
the torchrun ranks' worker): the same kernels, the same values, less time.

The interpreter swaps triton.language's builtins for interpreted ones while a launch runs
(`_patch_lang`: `inspect.getmembers` over triton.language, its tensor and math modules, and a new
wrapper set on each builtin), and restores them when it ends. It does this again on every call of
a `@triton.jit` helper inside the kernel, once per program of the grid, though the launch has
already patched them: those repeats found nothing left to patch (the builtins were wrappers by
then) and re-set the same tensor and dtype methods. They were a quarter of the sampler kernels'
time in the interpreter, more in kernels that call helpers in loops.

`install()` makes a helper's call skip `_patch_lang` when the running launch has patched every
triton.language module the helper can see; a helper that sees another one patches as before. The
launch's own patching and restoring are untouched. It does nothing where the interpreter is off
(TRITON_INTERPRET unset) or lacks the functions it wraps (written against triton 3.6 and 3.9).
"""
from __future__ import annotations

import inspect
import os


def _language_modules(fn, tl) -> frozenset:
    """The ids of the triton.language modules `fn`'s globals hold (what _patch_lang patches)."""
    return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))


def install() -> bool:
    """Patch the interpreter once per process where TRITON_INTERPRET=1; True when it was (or
    already is) installed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    if getattr(interpreter, "_fusedrl_tests_patched", False):
        return True
    needed = ("_patch_lang", "_LangPatchScope", "GridExecutor")
    if not all(hasattr(interpreter, name) for name in needed):
        return False
    patch_lang, launch_call = interpreter._patch_lang, interpreter.GridExecutor.__call__
    running = {"langs": None}   # the modules the running launch has patched; None between launches

    def patch_lang_once(fn):
        if running["langs"] is None:                      # a helper called outside a launch
            return patch_lang(fn)
        langs = _language_modules(fn, tl)
        if running["langs"] and langs <= running["langs"]:
            return interpreter._LangPatchScope()          # nothing to patch, nothing to restore
        running["langs"] = running["langs"] | langs
        return patch_lang(fn)

    def launch(self, *args, **kwargs):
        outer, running["langs"] = running["langs"], frozenset()
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            running["langs"] = outer

    interpreter._patch_lang = patch_lang_once
    interpreter.GridExecutor.__call__ = launch
    interpreter._fusedrl_tests_patched = True
    return True
