"""The batch-invariant mode's GPU matmul (fixed tiles, K split by K alone) under the Triton interpreter: close
to the float64 product, and each row's result the same bits whatever else is in the batch (alone,
among 7 or 70 rows, reordered), which is what makes the sampler's and the trainer's forwards agree."""
import pytest
import torch

from fusedrl.kernels.invariant import fixed_tile_matmul as matmul
from fusedrl.kernels.invariant.fixed_tile_matmul import BLOCK_K, BLOCK_M, SPLIT_K, linear_fixed_tiles
from invariant_testing import randn
from kernel_testing import DEVICE, needs_triton

pytestmark = needs_triton


def reference(x, w, bias):
    out = x.double() @ w.double().t()
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("n,k,o", [(1, 1, 1), (7, 70, 33), (40, BLOCK_K + 3, 130), (3, 2 * BLOCK_K, 64),
                                   (5, 2 * SPLIT_K + 70, 9)])  # the last: K in 3 pieces
@pytest.mark.parametrize("with_bias", [False, True])
def test_close_to_float64(dtype, tol, n, k, o, with_bias):
    x, w = randn(n, k, dtype=dtype, seed=1), randn(o, k, dtype=dtype, seed=2)
    bias = randn(o, dtype=dtype, seed=3) if with_bias else None
    out = linear_fixed_tiles(x, w, bias)
    assert out.dtype == dtype and out.shape == (n, o)
    expected = reference(x, w, bias)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * k ** 0.5)
    wide = linear_fixed_tiles(x, w, bias, out_dtype=torch.float32)  # logits: rounded once, to fp32
    assert wide.dtype == torch.float32
    torch.testing.assert_close(wide.double(), expected, rtol=1e-5, atol=1e-5 * k ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [BLOCK_K * 2 + 5, SPLIT_K + 3])  # one piece of K; two
def test_a_row_is_the_same_bits_in_any_batch(dtype, k):
    o = 70
    x, w, bias = randn(2 * BLOCK_M + 6, k, dtype=dtype, seed=4), randn(o, k, dtype=dtype, seed=5), randn(o, seed=6)
    whole = linear_fixed_tiles(x, w, bias.to(dtype), out_dtype=torch.float32)
    for i in (0, 5, BLOCK_M + 1, x.shape[0] - 1):
        alone = linear_fixed_tiles(x[i:i + 1], w, bias.to(dtype), out_dtype=torch.float32)
        among_7 = linear_fixed_tiles(x[max(i - 3, 0):max(i - 3, 0) + 7], w, bias.to(dtype), out_dtype=torch.float32)
        assert torch.equal(alone[0], whole[i])
        assert torch.equal(among_7[i - max(i - 3, 0)], whole[i])
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(7)).to(DEVICE)
    assert torch.equal(linear_fixed_tiles(x[order], w, bias.to(dtype), out_dtype=torch.float32), whole[order])


def test_mixed_dtypes_empty_shapes_and_bad_arguments():
    x, w = randn(3, 16), randn(5, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(linear_fixed_tiles(x, w).double(), reference(x, w.float(), None), rtol=1e-5, atol=1e-5)
    assert linear_fixed_tiles(randn(0, 16), randn(5, 16)).shape == (0, 5)
    bias = randn(5)
    assert torch.equal(linear_fixed_tiles(randn(2, 0), randn(5, 0), bias), bias.expand(2, 5))
    assert torch.equal(linear_fixed_tiles(randn(2, 0), randn(5, 0)), torch.zeros(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match=r"x \[N, K\] and weight \[O, K\]"):
        linear_fixed_tiles(randn(2, 3), randn(4, 5))
    with pytest.raises(ValueError, match="bias"):
        linear_fixed_tiles(randn(2, 3), randn(4, 3), randn(5))


def test_split_pieces_of_rows_change_nothing(monkeypatch):
    """With K split, rows run in pieces of whole tiles when the partial sums would not fit at once."""
    x, w, bias = randn(3 * BLOCK_M + 5, SPLIT_K + 40, seed=8), randn(20, SPLIT_K + 40, seed=9), randn(20, seed=10)
    whole = linear_fixed_tiles(x, w, bias)
    monkeypatch.setattr(matmul, "PARTIAL_ELEMENTS", 2 * 20 * BLOCK_M)  # one tile of rows per piece
    assert torch.equal(linear_fixed_tiles(x, w, bias), whole)
