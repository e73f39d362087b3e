"""silu_mul against float64: values and gradients of gate and up, odd sizes, a row, no rows."""
import pytest
import torch

from fusedrl.kernels import silu_mul, use_backend
from fusedrl.kernels.swiglu import silu_mul_reference
from kernel_testing import DEVICE, check_against_float64, needs_triton

pytestmark = needs_triton


def fused(gate, up):
    with use_backend("triton"):
        return silu_mul(gate, up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 37), (1, 96), (0, 16), (3, 700)])
def test_values_and_gradients_match_float64(shape, dtype):
    gate = (3 * torch.randn(shape, device=DEVICE)).to(dtype)   # SiLU's curved part and both tails
    up = torch.randn(shape, device=DEVICE).to(dtype)
    check_against_float64(fused, silu_mul_reference, (gate, up), (0, 1), name=f"silu_mul {shape} {dtype}")


def test_fp32_is_eager_torch_to_a_few_ulps():
    gate, up = torch.randn(5, 33, device=DEVICE), torch.randn(5, 33, device=DEVICE)
    torch.testing.assert_close(fused(gate, up), silu_mul_reference(gate, up), atol=1e-6, rtol=1e-6)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="silu_mul: gate"):
        fused(torch.ones(4, 8, device=DEVICE), torch.ones(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        fused(torch.ones(8, 4, device=DEVICE).t(), torch.ones(4, 8, device=DEVICE))
