"""mrope (M-RoPE of q and k in one launch, angles read from the tables) against float64: values and
gradients over both families' axis layouts, GQA head counts, odd head dims, strided q/k views, one
token and none; and the rotation a by-hand composition of the three axes' angles gives."""
import pytest
import torch

from fusedrl.kernels import mrope, reference, rope, use_backend
from kernel_testing import DEVICE, check_against_float64, needs_triton

pytestmark = needs_triton


def fused(*args):
    with use_backend("triton"):
        return mrope(*args)


def tables(length, dim, dtype):
    angles = torch.rand(length, dim // 2, device=DEVICE) * 6.3
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def sections(half):
    """Qwen2.5-VL's contiguous layout and Qwen3-VL's interleaved one, for `half` frequencies."""
    contiguous = [0] * (half - 2 * (half // 3)) + [1] * (half // 3) + [2] * (half // 3)
    interleaved = [j % 3 if j < 3 * (half // 3) else 0 for j in range(half)]
    return [torch.tensor(a, dtype=torch.int64, device=DEVICE) for a in (contiguous, interleaved)]


def positions(n, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, length, (3, n), generator=gen).to(DEVICE)


@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,q_heads,k_heads,dim",
                         [(5, 4, 2, 16), (1, 3, 1, 24), (0, 2, 2, 8), (9, 14, 2, 36)])
def test_values_and_gradients_match_float64(n, q_heads, k_heads, dim, dtype, layout):
    q = torch.randn(n, q_heads, dim, device=DEVICE).to(dtype)
    k = torch.randn(n, k_heads, dim, device=DEVICE).to(dtype)
    cos, sin = tables(37, dim, dtype)
    args = (q, k, cos, sin, positions(n, 37), sections(dim // 2)[layout])
    check_against_float64(fused, reference.mrope, args, (0, 1),
                          name=f"mrope {n}x{q_heads}/{k_heads}x{dim} {dtype} layout {layout}")


def test_equal_axes_are_plain_rope():
    """A text token (all three positions equal) rotates as 1-D RoPE at that position."""
    n, dim = 6, 16
    q, k = torch.randn(n, 3, dim, device=DEVICE), torch.randn(n, 1, dim, device=DEVICE)
    cos, sin = tables(20, dim, torch.float32)
    at = torch.randint(0, 20, (n,), device=DEVICE)
    ours = fused(q, k, cos, sin, at.expand(3, n).contiguous(), sections(dim // 2)[1])
    for a, b in zip(ours, rope(q, k, cos[at], sin[at])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_each_frequency_takes_its_axis_angle_by_hand():
    """Frequency 0 at the time position, 1 at the height one: a quarter turn where that axis's
    table row says so, nothing where it says zero angle."""
    q = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], device=DEVICE)   # x1 = (1, 2), x2 = (3, 4)
    cos = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], device=DEVICE)
    sin = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], device=DEVICE)
    axes = torch.tensor([0, 1], device=DEVICE)
    at = torch.tensor([[1], [0], [0]], device=DEVICE)  # time at row 1 (a quarter turn), height 0
    rotated, _ = fused(q, q.clone(), cos, sin, at, axes)
    assert rotated.tolist() == [[[-3.0, 2.0, 1.0, 4.0]]]


def test_strided_views_of_one_projection():
    n, heads, dim = 6, 3, 16
    qkv = torch.randn(n, 3 * heads * dim, device=DEVICE)
    q = qkv[:, : heads * dim].view(n, heads, dim)
    k = qkv[:, heads * dim: 2 * heads * dim].view(n, heads, dim)
    cos, sin = tables(11, dim, torch.float32)
    args = (q, k, cos, sin, positions(n, 11), sections(dim // 2)[0])
    for ours, expected in zip(fused(*args), reference.mrope(*args)):
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)


def test_bad_arguments_name_themselves():
    q, k = torch.randn(4, 2, 8, device=DEVICE), torch.randn(4, 1, 8, device=DEVICE)
    cos, sin = tables(10, 8, torch.float32)
    axes = sections(4)[0]
    with pytest.raises(ValueError, match=r"positions must be contiguous int64 \[3, 4\]"):
        fused(q, k, cos, sin, positions(4, 10)[:2], axes)
    with pytest.raises(ValueError, match=r"axes must be int64 \[4\]"):
        fused(q, k, cos, sin, positions(4, 10), axes[:3])
    with pytest.raises(ValueError, match=r"cos_table must be contiguous \[L, 8\]"):
        fused(q, k, cos[:, :6], sin, positions(4, 10), axes)
