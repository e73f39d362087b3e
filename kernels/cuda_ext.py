"""The optional compiled CUDA extension ``fusedrl.kernels._C`` (csrc/), loaded lazily on first use.

``is_available()`` says whether it can be used in this process; ``require()`` loads it or raises
one clear error saying why not and how to build it. Nothing imports ``_C`` eagerly, so the
package works the same without it (the Triton and PyTorch backends need no build).

Loading the module runs csrc/binding.cpp's TORCH_LIBRARY block, which defines the ops
``fusedrl::cuda_*`` with the schemas of the Triton custom ops of the same name without the prefix.
Each op module then registers, for its C++ twins, the fake (meta) implementation and autograd
formula it already has (``register_cuda_rules``), so the "cuda" backend traces under torch.compile
and is differentiable exactly like the "triton" one.
"""
from __future__ import annotations

import importlib
from typing import Optional

BUILD_HINT = ("build it with `FUSEDRL_FORCE_CUDA_BUILD=1 python setup.py build_ext --inplace` "
              "(needs a CUDA-enabled torch and nvcc)")


class _Extension:
    """Load state, filled on the first require(): the module, or why it could not be loaded."""
    module: Optional[object] = None
    error: Optional[str] = None


def _load() -> None:
    try:
        module = importlib.import_module("._C", __package__)
    except ImportError as error:
        _Extension.error = f"fusedrl.kernels._C is not built or cannot be loaded ({error})"
        return
    from . import advantages, kl, logprobs, ppo_loss
    try:
        for op_module in (logprobs, kl, advantages, ppo_loss):
            op_module.register_cuda_rules()
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
