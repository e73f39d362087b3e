"""Helpers for kernel tests: device, skips, tolerances, a verbose comparison and the environment
of a child running Triton's real JIT."""
import os
from pathlib import Path

import pytest
import torch

from fusedrl.kernels import cuda_ext

# The one place a test learns where it runs: the GPU when there is one, else the CPU (where the
# Triton kernels run in the interpreter). The `device` / `train_dtype` fixtures of conftest.py hand it
# to tests, so the same test checks the CUDA path on a GPU machine and the CPU path in CI.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
# What a training run with the default `train.precision=auto` keeps its parameters (and its export) in.
TRAIN_DTYPE = torch.bfloat16 if ON_GPU else torch.float32
TRITON_RUNS = ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"

gpu_only = pytest.mark.skipif(not ON_GPU, reason="large shape: GPU only (too slow in the interpreter)")
# Tests that measure what the Triton interpreter sees (bytes a kernel loads, the static check's
# recorded launches): machine-independent counts, taken where the interpreter runs (CI, `pytest` on
# the CPU); a GPU run of the suite skips them instead of counting on CUDA tensors.
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="counts kernels under the Triton interpreter: CPU runs only")
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
CUDA_EXT_RUNS = ON_GPU and cuda_ext.is_available()
needs_cuda_ext = pytest.mark.skipif(
    not CUDA_EXT_RUNS, reason=f"cuda backend: {cuda_ext.unavailable_reason() or 'needs a GPU'}")
# Every correctness test of a fused op runs, with the same checks and tolerances, on each of these
# (the `fused_backend` fixture in conftest.py).
FUSED_BACKENDS = [pytest.param("triton", id="triton"),
                  pytest.param("cuda", marks=needs_cuda_ext, id="cuda")]

LOW_PRECISION = (torch.bfloat16, torch.float16)
# Spacing of representable numbers relative to the value (2**-mantissa_bits): an output rounded
# once from an exact result is within one such unit of it, whichever way it rounds. (The Triton
# interpreter truncates fp32 -> bf16/fp16 where a GPU rounds to nearest, so half a unit is too
# tight to hold on both.)
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def assert_close(actual, expected, *, atol, rtol, name="value"):
    """allclose in float64 that names the first mismatching indices (NaN == NaN, inf == inf)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    close = torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    if not bool(close.all()):
        bad = (~close).nonzero()[:5].tolist()
        detail = ", ".join(f"{tuple(i)}: {actual[tuple(i)].item():.6g} vs {expected[tuple(i)].item():.6g}"
                           for i in bad)
        raise AssertionError(f"{name}: {int((~close).sum())}/{close.numel()} mismatched "
                             f"(atol={atol}, rtol={rtol}); first: {detail}")


def max_error(actual, expected):
    """Max |actual - expected|, counting matching NaNs and infinities as exact and a stray NaN as inf."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    same = (a == e) | (a.isnan() & e.isnan())
    diff = torch.where(same, 0.0, (a - e).abs().nan_to_num(nan=float("inf")))
    return diff.max().item() if diff.numel() else 0.0


def assert_within_torch_error(ours, oracle, torch_same_precision, *, name, slack=2.0, atol=1e-6):
    """Our max error vs the float64 oracle is at most ``slack`` x PyTorch's own max error at the
    same input precision (plus atol): the bar flash-attention uses for low-precision kernels."""
    ours_err = max_error(ours, oracle)
    torch_err = max_error(torch_same_precision, oracle)
    assert ours_err <= slack * torch_err + atol, (
        f"{name}: max error {ours_err:.3g} vs PyTorch's own {torch_err:.3g} at this precision")


def assert_low_precision_close(actual, exact, *, name, atol=1e-6):
    """Every element within one unit in the last place of the float64 result (plus atol for
    values near zero, whose exact result rounds to a subnormal or 0)."""
    assert_close(actual, exact, atol=atol, rtol=ULP[actual.dtype], name=name)


def rand_mask(*shape, p_valid=0.7, device=DEVICE):
    return torch.rand(*shape, device=device) < p_valid


def check_against_float64(op, reference, inputs, grad_inputs, *, name, slack=2.0, atol=1e-5):
    """Values and gradients of `op(*inputs)` (our kernels) against `reference` run in float64 on the
    same inputs, each bounded by `slack` x PyTorch's own error (`reference` at the inputs' precision)
    plus atol. grad_inputs: which inputs are differentiated; every output gets a random upstream
    gradient. The oracle keeps no intermediate rounding, so the bound is PyTorch's, not zero. The
    Triton interpreter truncates fp32 -> bf16/fp16 where GPUs round to nearest: each of up to two
    roundings in a row errs up to 1 unit instead of 1/2, and the worst element is then another one
    than PyTorch's: half-precision slack x4 there (a wrong formula still errs by O(1))."""
    if not ON_GPU and any(isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION for t in inputs):
        slack *= 4
    def run(fn, cast):
        xs = [cast(t).requires_grad_(i in grad_inputs) if isinstance(t, torch.Tensor) else t
              for i, t in enumerate(inputs)]
        outs = fn(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return xs, outs

    ours_in, ours = run(op, lambda t: t.detach().clone())
    torch_in, torch_same = run(reference, lambda t: t.detach().clone())
    exact_in, exact = run(reference, lambda t: t.detach().double())
    upstream = [torch.randn(o.shape, device=o.device) for o in exact]
    for xs, outs in ((ours_in, ours), (torch_in, torch_same), (exact_in, exact)):
        torch.autograd.backward([o for o in outs], [g.to(o.dtype) for g, o in zip(upstream, outs)])
    for i, (a, b, e) in enumerate(zip(ours, torch_same, exact)):
        assert a.dtype == b.dtype and a.shape == e.shape, f"{name} output {i}: {a.dtype} {tuple(a.shape)}"
        assert_within_torch_error(a, e, b, name=f"{name} output {i}", slack=slack, atol=atol)
    for i in grad_inputs:
        assert_within_torch_error(ours_in[i].grad, exact_in[i].grad, torch_in[i].grad,
                                  name=f"{name} grad of input {i}", slack=slack, atol=atol)


TOOLS = Path(__file__).resolve().parent / "tools"


def jit_env(tmp_path) -> dict:
    """A child's environment for Triton's real JIT: no interpreter, no variable that enters the
    key, a cache of its own (tmp_path/jit-cache), the test tools importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "jit-cache")
    env["PYTHONPATH"] = os.pathsep.join([str(TOOLS), env.get("PYTHONPATH", "")])
    return env
