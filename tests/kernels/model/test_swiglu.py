"""silu_mul against float64: values and gradients of the packed gate/up input, odd sizes, a row, no rows."""
import pytest
import torch

from fusedrl.kernels import reference, silu_mul, use_backend
from kernel_testing import DEVICE, check_against_float64, needs_triton

pytestmark = needs_triton


def fused(gate_up):
    with use_backend("triton"):
        return silu_mul(gate_up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 74), (1, 192), (0, 32), (3, 1400), (2, 3, 2050)])
def test_values_and_gradients_match_float64(shape, dtype):
    gate_up = (3 * torch.randn(shape, device=DEVICE)).to(dtype)  # SiLU's curved part and both tails
    check_against_float64(fused, reference.silu_mul, (gate_up,), (0,), name=f"silu_mul {shape} {dtype}")


def test_fp32_is_eager_torch_to_a_few_ulps():
    gate_up = torch.randn(5, 66, device=DEVICE)
    gate, up = gate_up[:, :33], gate_up[:, 33:]
    torch.testing.assert_close(fused(gate_up), torch.nn.functional.silu(gate) * up, atol=1e-6, rtol=1e-6)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="silu_mul: gate_up .* even last dim"):
        fused(torch.ones(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        fused(torch.ones(8, 4, device=DEVICE).t())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_integer_inputs_are_refused(backend, dtype):
    with use_backend(backend), pytest.raises(TypeError, match=f"silu_mul: gate_up must have dtype in .*got {dtype}"):
        silu_mul(torch.ones(4, 8, dtype=dtype, device=DEVICE))
