"""Backend choice for every fused op: which implementation runs for a given tensor.

Backends:
  "triton"  our fused Triton kernels; runs on CUDA tensors, and on CPU tensors when the Triton
            interpreter is on (``TRITON_INTERPRET=1``, how CI tests the kernels).
  "torch"   the plain PyTorch reference composition (``kernels.reference``), differentiated by
            autograd. Works everywhere; it is the oracle and the eager baseline.

Resolution order: the innermost ``use_backend(...)`` context of the calling thread, else the
``FUSEDRL_BACKEND`` environment variable, else "auto" (Triton where it can run, torch otherwise).

The override stack is thread-local (no process-wide mutable state) and is a plain list, which
torch.compile can read and guard on (it cannot trace ``contextvars``). Under torch.compile the
environment variable is read once, at trace time.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch

BACKENDS = ("triton", "torch")
_CHOICES = ("auto",) + BACKENDS


class _BackendStack(threading.local):
    def __init__(self) -> None:
        self.names: list[str] = []


_stack = _BackendStack()


def _check_name(name: str, source: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {_CHOICES}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` ("auto", "triton" or "torch")."""
    _stack.names.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _stack.names.pop()


def triton_interpreting() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> str:
    """The backend asked for by the innermost ``use_backend`` or ``FUSEDRL_BACKEND`` ("auto" if none)."""
    if _stack.names:
        return _stack.names[-1]
    return _check_name(os.environ.get("FUSEDRL_BACKEND", "auto"), "FUSEDRL_BACKEND")


def backend_for(x: torch.Tensor) -> str:
    """The backend that will run an op whose main input is ``x``: "triton" or "torch".

    Raises RuntimeError when "triton" is requested for a tensor it cannot run on.
    """
    name = requested_backend()
    triton_ok = x.is_cuda or triton_interpreting()
    if name == "auto":
        return "triton" if triton_ok else "torch"
    if name == "triton" and not triton_ok:
        raise RuntimeError(
            f"backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1; got a tensor on {x.device}"
        )
    return name


def sync_checks_enabled(x: torch.Tensor) -> bool:
    """Whether to run input checks that read tensor values (a host sync on GPU).

    Always on for CPU tensors. On GPU they are on unless ``FUSEDRL_SKIP_SYNC_CHECKS=1``. They are
    skipped while torch.compile traces (data-dependent Python branches would break the graph); the
    Triton kernels still never read out of bounds and turn an invalid label into a NaN output.
    """
    if torch.compiler.is_compiling():
        return False
    if x.device.type == "cpu":
        return True
    return os.environ.get("FUSEDRL_SKIP_SYNC_CHECKS", "0") != "1"
