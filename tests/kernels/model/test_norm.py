"""rms_norm (with and without the residual add; Qwen3's per-head q/k norm shape) against float64:
values and gradients of x, residual and weight, bounded by PyTorch's own error at each precision."""
import pytest
import torch

from fusedrl.kernels import reference, rms_norm, use_backend
from kernel_testing import DEVICE, check_against_float64, needs_triton

pytestmark = needs_triton
EPS = 1e-6


def fused(x, weight, eps, residual=None):
    with use_backend("triton"):
        return rms_norm(x, weight, eps, residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 40), (1, 96), (3, 5, 24), (0, 40), (2600, 8)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_values_and_gradients_match_float64(shape, dtype, with_residual):
    # (2600, 8): more row tiles than backward programs, so each program loops (grid-stride);
    # (3, 5, 24): Qwen3's q/k norm over the heads of tokens; (0, 40): no rows.
    x = torch.randn(shape, device=DEVICE).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    if with_residual:
        residual = torch.randn(shape, device=DEVICE).to(dtype)
        check_against_float64(fused, reference.rms_norm, (x, weight, EPS, residual), (0, 1, 3),
                              name=f"add_rms_norm {shape} {dtype}")
    else:
        check_against_float64(fused, reference.rms_norm, (x, weight, EPS), (0, 1), name=f"rms_norm {shape} {dtype}")


def test_fp32_forward_is_the_eager_composition_to_a_few_ulps():
    x, weight = torch.randn(6, 50, device=DEVICE), torch.randn(50, device=DEVICE)
    torch.testing.assert_close(fused(x, weight, EPS), reference.rms_norm(x, weight, EPS), atol=1e-6, rtol=1e-6)


def test_the_same_forward_with_and_without_autograd():
    # Scoring (no grad) and the update (grad) must give the same bits.
    x, residual = torch.randn(5, 32, device=DEVICE), torch.randn(5, 32, device=DEVICE)
    weight = torch.randn(32, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        scored = fused(x, weight, EPS, residual)
    trained = fused(x.requires_grad_(), weight, EPS, residual)
    assert all(torch.equal(a, b) for a, b in zip(scored, trained))


def test_bad_arguments_name_themselves():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight \(7,\) does not match x"):
        fused(x, torch.ones(7, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="residual"):
        fused(x, torch.ones(8, device=DEVICE), EPS, torch.randn(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        fused(torch.randn(8, 4, device=DEVICE).t(), torch.ones(8, device=DEVICE), EPS)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("change, error, match", [
    (dict(eps=-1e-6), ValueError, r"rms_norm: eps must be a finite number >= 0, got -1e-06"),
    (dict(eps=float("nan")), ValueError, r"rms_norm: eps must be a finite number >= 0, got nan"),
    (dict(eps=float("inf")), ValueError, r"rms_norm: eps must be a finite number >= 0, got inf"),
    (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, r"rms_norm: x must have dtype in \(float32.*got torch.int64"),
    (dict(weight=torch.ones(8, dtype=torch.int32)), TypeError, r"rms_norm: weight must have dtype in .*got torch.int32"),
    (dict(residual=torch.ones(4, 8, dtype=torch.int32)), TypeError, r"rms_norm: residual must have dtype in .*int32"),
    (dict(x=torch.ones(4, 0), weight=torch.ones(0)), ValueError,
     r"rms_norm: x must have shape \[\.\.\., C\] with C >= 1, got \(4, 0\)"),
])
def test_bad_eps_dtype_and_empty_rows_are_refused(backend, change, error, match):
    args = dict(x=torch.randn(4, 8), weight=torch.ones(8), eps=EPS, residual=None)
    args.update(change)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with use_backend(backend), pytest.raises(error, match=match):
        rms_norm(args["x"], args["weight"], args["eps"], args["residual"])

