"""tests/interpreter_patching.py, installed for the suite by tests/conftest.py: a kernel calling
@triton.jit helpers in every program computes what it should, the interpreter patches
triton.language once per launch however many programs call helpers, and the builtins are
triton's own again after the launch."""
import os

import pytest
import torch

import interpreter_patching

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton interpreter's patching: runs where TRITON_INTERPRET=1")

triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _scaled(x, scale):
    return x * scale


@triton.jit
def _plus_half(x):
    return _scaled(x, 1.0) + _scaled(x, 0.5)  # a helper calling a helper


@triton.jit
def _helpers_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, _plus_half(x) + tl.exp(x) - tl.exp(x), mask=mask)


def _launch(n: int, block: int = 8) -> torch.Tensor:
    x = torch.randn(n)
    out = torch.full_like(x, float("nan"))
    _helpers_kernel[(triton.cdiv(n, block),)](x, out, n, BLOCK=block)
    torch.testing.assert_close(out, x * 1.5, rtol=1e-6, atol=1e-6)
    return out


def test_helpers_in_every_program_compute_their_values():
    assert interpreter_patching.install()
    for n in (1, 7, 37):
        _launch(n)


def test_one_launch_patches_as_much_for_five_programs_as_for_one(monkeypatch):
    from triton.runtime import interpreter

    assert interpreter_patching.install()
    _launch(8)  # the rewrite of each function, once
    set_attrs = []
    real = interpreter._LangPatchScope.set_attr
    monkeypatch.setattr(interpreter._LangPatchScope, "set_attr",
                        lambda self, obj, name, value: (set_attrs.append(name), real(self, obj, name, value)))
    _launch(8)
    one_program = len(set_attrs)
    set_attrs.clear()
    _launch(40)
    # Unpatched, each helper call of each program sets the tensor's and dtypes' methods again.
    assert one_program > 0 and len(set_attrs) == one_program


def test_the_builtins_are_triton_s_own_after_a_launch():
    missing = object()
    load, exp, index = tl.load, tl.exp, getattr(tl.tensor, "__index__", missing)
    _launch(37)
    assert tl.load is load and tl.exp is exp and getattr(tl.tensor, "__index__", missing) is index
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.exp)
