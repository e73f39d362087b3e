"""masked_whiten's two-launch Triton kernels against the float64 reference: odd sizes, both dtypes,
several programs and several blocks per program, masked rows, one and no valid entry; and the same
numbers, to fp32 rounding, as the torch composition of kernels.rl.statistics it is the fast path of."""
import pytest
import torch

from fusedrl.kernels import masked_whiten, reference, use_backend
from fusedrl.kernels.rl import statistics, whiten
from kernel_testing import DEVICE, TRITON_RUNS, assert_close, needs_triton, rand_mask

pytestmark = needs_triton


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
@pytest.mark.parametrize("shape, max_programs", [((1, 1), 1024), ((3, 37), 1024), ((5, 1001), 1024),
                                                 ((5, 1001), 2), ((7, 2048), 3)])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_matches_float64_reference(shape, max_programs, dtype, atol, shift_mean, monkeypatch):
    # max_programs 2 / 3: each program walks several blocks (the path of inputs above 2M entries).
    monkeypatch.setattr(whiten, "MAX_PROGRAMS", max_programs)
    x = (torch.randn(shape, device=DEVICE) * 3 + 5).to(dtype)
    mask = rand_mask(*shape)
    mask[0] = False                                                   # a fully masked row
    with use_backend("triton"):
        white = masked_whiten(x, mask, shift_mean=shift_mean)
    expected = reference.masked_whiten(x.double(), mask, shift_mean=shift_mean)
    assert white.dtype == torch.float32
    # bf16 inputs are exact in fp32: the error is the fp32 arithmetic's, as for fp32 inputs
    assert_close(white, expected, atol=atol, rtol=1e-5)


def test_empty_and_gradient_fallback():
    with use_backend("triton"):
        assert masked_whiten(torch.zeros(0, 4, device=DEVICE), torch.zeros(0, 4, dtype=torch.bool,
                                                                           device=DEVICE)).shape == (0, 4)
        x = torch.randn(2, 5, device=DEVICE, requires_grad=True)
        mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
        masked_whiten(x, mask)[0, 0].backward()                       # differentiable where asked
    expected = torch.autograd.grad(reference.masked_whiten(x, mask)[0, 0], x)[0]
    assert_close(x.grad, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape, max_programs", [((1, 3), 1024), ((5, 1001), 1024), ((7, 2048), 3)])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_fast_path_is_the_torch_path(shape, max_programs, shift_mean, monkeypatch):
    monkeypatch.setattr(whiten, "MAX_PROGRAMS", max_programs)
    x = torch.randn(shape, device=DEVICE) * 3 + 5
    mask = rand_mask(*shape)
    mask[0, 1:] = False                                               # a row with one valid entry
    torch_path = statistics.masked_whiten(x, mask, shift_mean=shift_mean)
    with use_backend("triton"):
        fast = masked_whiten(x, mask, shift_mean=shift_mean)
        # a sum over ranks (here one rank: the identity) joins the partials between the launches
        over_ranks = masked_whiten(x, mask, shift_mean=shift_mean, sum_over=lambda t: t.clone())
    # fp32 rounding: Chan's per-block moments against two whole-tensor passes
    assert_close(fast, torch_path, atol=2e-6, rtol=2e-6)
    assert_close(over_ranks, torch_path, atol=2e-6, rtol=2e-6)


def test_fp64_input_gives_fp32_on_every_backend():
    """The docstring's fp32, whichever backend runs (the torch composition kept fp64's)."""
    x = torch.randn(3, 7, dtype=torch.float64, device=DEVICE)
    mask = rand_mask((3, 7))
    for backend in ["torch"] + (["triton"] if TRITON_RUNS else []):
        with use_backend(backend):
            assert masked_whiten(x, mask).dtype == torch.float32, backend
