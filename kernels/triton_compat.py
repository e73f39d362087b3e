"""`triton` and `triton.language` for the files that define Triton kernels (ours and the engine's),
or stand-ins when triton is not installed (it ships Linux wheels only).

With the stand-ins the kernel definitions still import (`@triton.jit` wraps the function in an
object that refuses to launch), so `import fusedrl.kernels` works everywhere and the dispatcher
runs every op on the torch backend (`dispatch.backend_for` never picks Triton without it).
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    TRITON_AVAILABLE = True
except ImportError:  # no triton: stand-ins, see the module docstring
    TRITON_AVAILABLE = False

    class _UnlaunchableKernel:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(
                f"Triton kernel {self.fn.__name__} cannot run: triton is not installed "
                f"(use the torch backend)")

    class _TritonStandIn:
        """Answers `triton.jit`, `triton.jit(...)` and any `tl.<name>` used at definition time."""

        def __getattr__(self, name: str):
            return self

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return _UnlaunchableKernel(args[0])
            return self  # a decorator factory such as triton.jit(do_not_specialize=...)

    triton = tl = _TritonStandIn()

__all__ = ["triton", "tl", "TRITON_AVAILABLE"]
