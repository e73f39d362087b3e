"""The optional compiled CUDA extension ``fusedrl.kernels._C`` (csrc/), loaded lazily on first use.

``is_available()`` says whether it can be used in this process; ``require()`` loads it or raises
one clear error saying why not and how to build it. Nothing imports ``_C`` eagerly, so the
package works the same without it (the Triton and PyTorch backends need no build).

Loading the module runs csrc/binding.cpp's TORCH_LIBRARY block, which defines the ops
``fusedrl::cuda_*``. Each op module with a C++ twin hands this loader, when it is imported, the
function registering the twin's fake (meta) implementation and autograd formula (``on_load``); the
loader runs them once the library is loaded, so the "cuda" backend traces under torch.compile and
is differentiable like the "triton" one. This module imports no op module (they import it).
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

from .triton_compat import TRITON_AVAILABLE

BUILD_HINT = ("build it with `FUSEDRL_FORCE_CUDA_BUILD=1 python setup.py build_ext --inplace` "
              "(needs a CUDA-enabled torch and nvcc)")


# The C++ kernels are templated on one float dtype per op, among these; Triton loads each input in
# its own.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Extension:
    """Load state, filled on the first require(): the module, or why it could not be loaded."""
    module: Optional[object] = None
    error: Optional[str] = None
    registrations: list[Callable[[], None]] = []  # the op modules' rules for their C++ twins


def on_load(register: Callable[[], None]) -> None:
    """Have ``register`` (an op module's fake and autograd rules for its C++ twins) run when the
    extension loads, or now if it is loaded already."""
    _Extension.registrations.append(register)
    if _Extension.module is not None:
        register()


def _load() -> None:
    try:
        module = importlib.import_module("._C", __package__)
    except ImportError as error:
        _Extension.error = f"fusedrl.kernels._C is not built or cannot be loaded ({error})"
        return
    try:
        for register in _Extension.registrations:
            register()
    except Exception as error:  # kept as the reason require() gives: the Triton path stays usable
        _Extension.error = (f"fusedrl.kernels._C loaded but its ops could not be registered "
                            f"({type(error).__name__}: {error})")
        return
    _Extension.module = module


def require() -> None:
    """Load the extension (once); raise RuntimeError naming the cause if it is unavailable."""
    if _Extension.module is not None:
        return
    if _Extension.error is None:
        _load()
    if _Extension.module is None:
        raise RuntimeError(f"backend 'cuda' is unavailable: {_Extension.error}; {BUILD_HINT}")


def is_loaded() -> bool:
    """Whether a require() has loaded the extension already (tries nothing)."""
    return _Extension.module is not None


def is_available() -> bool:
    """Whether the compiled extension is built and loads here (it may still need CUDA tensors)."""
    try:
        require()
    except RuntimeError:
        return False
    return True


def unavailable_reason() -> Optional[str]:
    """Why the extension cannot be used (None when it can)."""
    return None if is_available() else _Extension.error


def takes(*tensors: torch.Tensor) -> bool:
    """Whether a C++ kernel takes these float inputs as they are, as the Triton one does: one dtype
    for all, among KERNEL_DTYPES."""
    dtypes = {t.dtype for t in tensors}
    return len(dtypes) == 1 and dtypes <= set(KERNEL_DTYPES)


def twin_or_fallback(backend: str, *tensors: torch.Tensor, supported: bool = True) -> str:
    """The backend an op with a C++ twin runs on: ``backend``, except that "cuda" runs only where
    the twin takes the op's own inputs (``takes``) and the mode asked for (``supported``: the op
    says whether its twin has it); elsewhere the op runs as on "triton" (torch without triton),
    never with torch math wrapped around the twin."""
    if backend != "cuda" or (supported and takes(*tensors)):
        return backend
    return "triton" if TRITON_AVAILABLE else "torch"
