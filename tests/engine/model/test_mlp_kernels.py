"""The fused SiLU(gate) * up kernel against a float64 reference and its eager torch form.

On CPU it runs under TRITON_INTERPRET=1. Tolerances: fp32 a few ulps (sigmoid differs in the last
bits); half precision: the eager form's two roundings (SiLU, then the product), 2^-8 relative each
for bf16, on values of magnitude <~10.
"""

import pytest
import torch
import torch.nn.functional as F

from fusedrl.engine.model.mlp_kernels import silu_mul_torch, silu_mul_triton
from kernel_testing import DEVICE, needs_triton

pytestmark = needs_triton


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 8e-2)])
@pytest.mark.parametrize("shape", [(3, 37), (5, 1031), (1,)])  # odd sizes: partial blocks
def test_silu_mul_matches_float64(dtype, atol, shape):
    g = torch.Generator().manual_seed(0)
    gate = (3 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    up = (3 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    exact = F.silu(gate.double()) * up.double()
    out = silu_mul_triton(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape
    torch.testing.assert_close(out.double(), exact, atol=atol, rtol=atol)
    torch.testing.assert_close(silu_mul_torch(gate, up).double(), exact, atol=atol, rtol=atol)


def test_silu_mul_rounds_as_eager_torch_in_fp32():
    g = torch.Generator().manual_seed(1)
    gate, up = torch.randn(4, 999, generator=g).to(DEVICE), torch.randn(4, 999, generator=g).to(DEVICE)
    torch.testing.assert_close(silu_mul_triton(gate, up), silu_mul_torch(gate, up), atol=1e-6, rtol=1e-6)


def test_silu_mul_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one shape"):
        silu_mul_triton(torch.ones(4, 8, device=DEVICE), torch.ones(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        silu_mul_triton(torch.ones(8, 4, device=DEVICE).t(), torch.ones(4, 8, device=DEVICE))
