"""Inference-time Triton kernels (residual add + RMSNorm, RoPE) against their PyTorch forms.

On CPU they run under TRITON_INTERPRET=1 (tiny shapes). fp32 tolerances: the kernels reduce in a
different order (and use 1/sqrt for rsqrt), a few ulps; half precision: one rounding of the output
(2^-8 relative for bf16) on values of magnitude <~4.
"""

import pytest
import torch

from fusedrl.engine.model.norm_rope import add_rms_norm_triton, rms_norm_torch, rope_torch, rope_triton_
from kernel_testing import DEVICE, needs_triton

pytestmark = needs_triton
TOLERANCES = [(torch.float32, 1e-5), (torch.bfloat16, 4e-2), (torch.float16, 5e-3)]


@pytest.mark.parametrize("dtype,atol", TOLERANCES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_reference(dtype, atol, with_residual):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 40, generator=g).to(DEVICE, dtype)  # 40 columns: not a power of two
    weight = (1 + 0.1 * torch.randn(40, generator=g)).to(DEVICE, dtype)
    residual = torch.randn(5, 3, 40, generator=g).to(DEVICE, dtype) if with_residual else None
    expected_sum = None if residual is None else x + residual
    expected = rms_norm_torch(x if residual is None else expected_sum, weight, 1e-6)
    out = add_rms_norm_triton(x, weight, 1e-6, residual)
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=0)
    if with_residual:  # the sum is left in `residual`, rounded as torch rounds x + residual
        if dtype == torch.bfloat16 and DEVICE == "cpu":
            # The Triton interpreter truncates fp32 -> bf16 where GPUs round to nearest: 1 ulp.
            torch.testing.assert_close(residual, expected_sum, atol=0, rtol=2 ** -7)
        else:
            assert torch.equal(residual, expected_sum)


@pytest.mark.parametrize("dtype,atol", TOLERANCES)
@pytest.mark.parametrize("head_dim", [16, 24])
def test_rope_matches_reference(dtype, atol, head_dim):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, head_dim, generator=g).to(DEVICE, dtype)
    angles = torch.rand(6, head_dim // 2, generator=g) * 6
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(DEVICE, dtype)
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(DEVICE, dtype)
    expected = rope_torch(x, cos, sin)
    out = rope_triton_(x.clone(), cos, sin)
    # torch rounds each product and the sum to the dtype; the kernel rounds once: up to ~3 roundings.
    torch.testing.assert_close(out.float(), expected.float(), atol=3 * atol, rtol=0)


def test_rope_rotates_strided_projections_in_place():
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(4, 2 * 16 + 16, generator=g).to(DEVICE)
    q = qkv[:, :32].view(4, 2, 16)  # a view into a wider row, as a fused projection would give
    cos = torch.ones(4, 16, device=DEVICE)
    sin = torch.zeros(4, 16, device=DEVICE)
    before = qkv.clone()
    rope_triton_(q, cos, sin)  # the identity rotation
    assert torch.equal(qkv, before)
    cos, sin = torch.zeros(4, 16, device=DEVICE), torch.ones(4, 16, device=DEVICE)
    rope_triton_(q, cos, sin)  # a quarter turn: (x1, x2) -> (-x2, x1)
    torch.testing.assert_close(q, torch.cat((-before[:, :32].view(4, 2, 16)[..., 8:],
                                             before[:, :32].view(4, 2, 16)[..., :8]), -1))
    assert torch.equal(qkv[:, 32:], before[:, 32:])  # the rest of the row is untouched


def test_norm_and_rope_pack_short_rows_across_programs():
    # 128-wide rows (Qwen3's q/k norm) go 8 to a program and 64-wide heads 16 (rope): 37 tokens x
    # 3 heads leave the last program part-filled.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 3, 128, generator=g).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(128, generator=g)).to(DEVICE)
    torch.testing.assert_close(add_rms_norm_triton(x, weight, 1e-6), rms_norm_torch(x, weight, 1e-6),
                               atol=1e-5, rtol=0)
    angles = torch.rand(37, 32, generator=g) * 6
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(DEVICE)
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(DEVICE)
    q = x[..., :64].contiguous()
    torch.testing.assert_close(rope_triton_(q.clone(), cos, sin), rope_torch(q, cos, sin), atol=1e-5, rtol=0)
