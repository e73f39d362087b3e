"""rope (q and k in one launch) against float64: values and gradients, GQA head counts, odd head
dims and strided q/k views (as sliced from a packed projection)."""
import pytest
import torch

from fusedrl.kernels import reference, rope, use_backend
from kernel_testing import DEVICE, check_against_float64, needs_triton

pytestmark = needs_triton


def fused(q, k, cos, sin):
    with use_backend("triton"):
        return rope(q, k, cos, sin)


def tables(n, dim, dtype):
    angles = torch.rand(n, dim // 2, device=DEVICE) * 6.3
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,q_heads,k_heads,dim", [(5, 4, 2, 16), (1, 3, 1, 24), (0, 2, 2, 8), (9, 14, 2, 64)])
def test_values_and_gradients_match_float64(n, q_heads, k_heads, dim, dtype):
    q = torch.randn(n, q_heads, dim, device=DEVICE).to(dtype)
    k = torch.randn(n, k_heads, dim, device=DEVICE).to(dtype)
    cos, sin = tables(n, dim, dtype)
    check_against_float64(fused, reference.rope, (q, k, cos, sin), (0, 1), name=f"rope {n}x{q_heads}/{k_heads}x{dim} {dtype}")


def test_strided_views_of_one_projection():
    n, heads, dim = 6, 3, 16
    qkv = torch.randn(n, 3 * heads * dim, device=DEVICE)
    q = qkv[:, : heads * dim].view(n, heads, dim)
    k = qkv[:, heads * dim: 2 * heads * dim].view(n, heads, dim)
    cos, sin = tables(n, dim, torch.float32)
    for ours, expected in zip(fused(q, k, cos, sin), reference.rope(q, k, cos, sin)):
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)


def test_quarter_turn_by_hand():
    q = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], device=DEVICE)   # x1 = (1, 2), x2 = (3, 4)
    cos, sin = torch.zeros(1, 4, device=DEVICE), torch.ones(1, 4, device=DEVICE)
    rotated, _ = fused(q, q.clone(), cos, sin)                   # (x1, x2) -> (-x2, x1)
    assert rotated.tolist() == [[[-3.0, -4.0, 1.0, 2.0]]]


def test_bad_arguments_name_themselves():
    q, k = torch.randn(4, 2, 8, device=DEVICE), torch.randn(4, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"cos must be contiguous \[4, 8\]"):
        fused(q, k, torch.ones(3, 8, device=DEVICE), torch.ones(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="one N and an even D"):
        fused(q, torch.randn(5, 1, 8, device=DEVICE), torch.ones(4, 8, device=DEVICE), torch.ones(4, 8, device=DEVICE))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_integer_inputs_are_refused(backend):
    cos, sin = tables(3, 8, torch.float32)
    q = torch.ones(3, 2, 8, dtype=torch.int64, device=DEVICE)
    with use_backend(backend), pytest.raises(TypeError, match="rope: q must have dtype in .*got torch.int64"):
        rope(q, q.float(), cos, sin)
