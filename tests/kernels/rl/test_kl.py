"""kl_penalty (Triton and CUDA backends) against the float64 reference, plus hand-computed values."""
import math

import pytest
import torch

from fusedrl.kernels import kl_penalty, reference, use_backend
from kernel_testing import DEVICE, assert_close, needs_triton, rand_mask

pytestmark = needs_triton
ESTIMATORS = ["k1", "k2", "k3"]


def test_hand_computed_values(fused_backend):
    # logp = log 0.5, ref = log 0.25: d = ref - logp = -log 2.
    logp = torch.tensor([math.log(0.5)], device=DEVICE)
    ref = torch.tensor([math.log(0.25)], device=DEVICE)
    d = -math.log(2.0)
    expected = {"k1": math.log(2.0), "k2": 0.5 * d * d, "k3": 0.5 - d - 1.0}  # exp(d) = 0.5
    with use_backend(fused_backend):
        for name, value in expected.items():
            assert kl_penalty(logp, ref, estimator=name).item() == pytest.approx(value, rel=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (3, 1), (5, 37), (2, 3, 1100)])
def test_matches_reference(shape, dtype, estimator, fused_backend):
    logp = (torch.randn(shape, device=DEVICE) - 2).to(dtype)
    ref = (logp.float() + torch.randn(shape, device=DEVICE) * 0.5).to(dtype)
    mask = rand_mask(*shape)
    g = torch.randn(shape, device=DEVICE)
    x, y = logp.clone().requires_grad_(), ref.clone().requires_grad_()
    with use_backend(fused_backend):
        kl = kl_penalty(x, y, estimator=estimator, mask=mask)
    (kl * g).sum().backward()
    x64, y64 = logp.double().requires_grad_(), ref.double().requires_grad_()
    kl64 = reference.kl_penalty(x64, y64, estimator=estimator, mask=mask)
    (kl64 * g.double()).sum().backward()
    assert kl.dtype == torch.float32
    assert_close(kl, kl64, atol=1e-6, rtol=1e-5, name="kl")
    assert torch.all(kl[~mask] == 0) and torch.all(x.grad[~mask] == 0)
    # Gradients come out in the inputs' dtype, rounded once from fp32.
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7
    assert_close(x.grad, x64.grad, atol=1e-5, rtol=tol, name="grad_logp")
    assert_close(y.grad, y64.grad, atol=1e-5, rtol=tol, name="grad_ref_logp")


def test_no_mask_and_empty(fused_backend):
    logp, ref = torch.randn(4, 6, device=DEVICE), torch.randn(4, 6, device=DEVICE)
    with use_backend(fused_backend):
        assert_close(kl_penalty(logp, ref, estimator="k3"),
                     reference.kl_penalty(logp.double(), ref.double(), estimator="k3"),
                     atol=1e-6, rtol=1e-5)
        empty = kl_penalty(torch.zeros(0, 3, device=DEVICE), torch.zeros(0, 3, device=DEVICE))
    assert empty.shape == (0, 3)


@pytest.mark.parametrize("kwargs", [dict(), dict(clamp=0.5, log_ratio_clamp=1.0)])
def test_fp64_inputs_give_fp32_kl_on_every_backend(kwargs):
    """kl [...] fp32 as the docstring says, whatever the backend: the torch one computes fp64 inputs
    in fp64 (its reference, the oracle, stays fp64) and returns them rounded, as the kernel does."""
    logp = torch.randn(4, 6, device=DEVICE, dtype=torch.float64) - 2
    ref = logp + torch.randn(4, 6, device=DEVICE, dtype=torch.float64) * 0.5
    mask = rand_mask(4, 6)
    exact = reference.kl_penalty(logp, ref, estimator="k3", mask=mask, **kwargs)
    assert exact.dtype == torch.float64                                        # the oracle keeps fp64
    for backend in ("torch", "triton"):
        x = logp.clone().requires_grad_()
        with use_backend(backend):
            kl = kl_penalty(x, ref, estimator="k3", mask=mask, **kwargs)
            weighted = kl_penalty(x, ref, estimator="k3", mask=mask, is_weight=torch.ones_like(ref), **kwargs)
        assert kl.dtype == weighted.dtype == torch.float32, backend
        assert_close(kl, exact, atol=1e-6, rtol=1e-5, name=f"kl {backend}")
        kl.sum().backward()
        assert x.grad.dtype == torch.float64, backend


def test_k3_is_nonnegative(fused_backend):
    logp, ref = torch.randn(1000, device=DEVICE) * 3, torch.randn(1000, device=DEVICE) * 3
    with use_backend(fused_backend):
        assert torch.all(kl_penalty(logp, ref, estimator="k3") >= 0)


@pytest.mark.parametrize("bad, error, match", [
    (dict(estimator="k4"), ValueError, "unknown estimator 'k4'"),
    (dict(ref_logp=torch.zeros(2, 4)), ValueError, r"ref_logp must have the shape of logp \(2, 3\)"),
    (dict(ref_logp=torch.zeros(3)), ValueError, "ref_logp must have the shape"),
    (dict(mask=torch.ones(2, 3, dtype=torch.complex64)), TypeError, "mask must be bool, integer or float"),
    (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask must have the shape of logp"),
    (dict(logp=torch.zeros(2, 3, dtype=torch.long)), TypeError, "logp must have dtype"),
])
def test_bad_input(bad, error, match):
    args = dict(logp=torch.zeros(2, 3), ref_logp=torch.zeros(2, 3))
    args.update(bad)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        kl_penalty(args.pop("logp"), args.pop("ref_logp"), **args)
