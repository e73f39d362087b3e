"""norm_linear (RMSNorm with the residual add as a GEMM's prologue, SiLU * up as its epilogue) against
the unfused composition in float64: odd sizes, one row, no rows, with and without residual, bias and
glu, fp32 and bf16; the new residual stream bit for bit; bad arguments named."""
import pytest
import torch

from fusedrl.kernels import use_backend
from fusedrl.kernels.model.norm import rms_norm
from fusedrl.kernels import reference
from fusedrl.kernels.model.norm_linear import Tiles, launch, norm_linear
from kernel_testing import DEVICE, ULP, assert_close, needs_triton

pytestmark = needs_triton


def inputs(rows, k, n, dtype, residual, bias, glu, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(DEVICE, dtype)
    r = torch.randn(rows, k, generator=g).to(DEVICE, dtype) if residual else None
    norm_w = (1 + 0.3 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    weight = (torch.randn(n * (2 if glu else 1), k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    b = torch.randn(weight.shape[0], generator=g).to(DEVICE, dtype) if bias else None
    return x, r, norm_w, weight, b


CASES = [  # rows, K, N (outputs), residual, bias, glu
    (1, 96, 40, True, True, False),   # a decode row, q/k/v-like with bias
    (5, 70, 24, True, False, True),   # gate/up with SiLU * up, K not a multiple of the K tile
    (3, 64, 50, False, False, False),  # no residual (the first layer's norm)
    (17, 33, 8, True, True, True),    # more rows than one row tile
    (2, 300, 20, True, True, True),   # K over three K tiles of a decode step (the last partial)
    (20, 150, 12, True, False, False),  # K over three tiles of a wider batch's tile shape
    (0, 32, 16, True, False, False),  # no rows
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, k, n, residual, bias, glu", CASES)
def test_matches_the_unfused_composition_in_float64(rows, k, n, residual, bias, glu, dtype):
    x, r, norm_w, weight, b = inputs(rows, k, n, dtype, residual, bias, glu)
    with use_backend("triton"):
        y, total = norm_linear(x, r, norm_w, 1e-6, weight, b, glu)
    as64 = [t.double() if t is not None else None for t in (x, r, norm_w, weight, b)]
    y64, total64 = reference.norm_linear(as64[0], as64[1], as64[2], 1e-6, as64[3], as64[4], glu)
    assert y.shape == (rows, n) and y.dtype == dtype and total.shape == x.shape
    # fp32: summation order only; bf16: the rounded norm, GEMM output and SiLU (a few units each).
    tol = 2e-5 if dtype == torch.float32 else 6 * ULP[dtype]
    assert_close(y, y64, atol=tol, rtol=tol, name=f"norm_linear {rows}x{k}->{n} {dtype}")
    if residual:  # the residual stream is exactly what the norm kernel writes
        with use_backend("triton"):
            assert torch.equal(total, rms_norm(x, norm_w, 1e-6, r)[1])
    else:
        assert total is x


def test_a_row_is_the_same_whatever_else_is_in_the_batch():
    """Each output row depends on its own input row only (no split-K across rows, no batch-sized tiles
    in the arithmetic of a row): a decode row gets the same numbers alone as among 40."""
    x, r, norm_w, weight, b = inputs(40, 96, 48, torch.float32, True, True, True)
    with use_backend("triton"):
        full = norm_linear(x, r, norm_w, 1e-6, weight, b, True)[0]
        alone = norm_linear(x[7:8].contiguous(), r[7:8].contiguous(), norm_w, 1e-6, weight, b, True)[0]
    torch.testing.assert_close(alone, full[7:8], atol=1e-6, rtol=1e-6)


def test_bad_arguments_name_themselves():
    x, r, norm_w, weight, b = inputs(2, 16, 6, torch.float32, True, True, False)
    with use_backend("triton"):
        with pytest.raises(ValueError, match="norm_linear: norm_weight must be \\[16\\]"):
            norm_linear(x, r, norm_w[:8], 1e-6, weight, b)
        with pytest.raises(ValueError, match="norm_linear: weight must be a contiguous \\[N, 16\\]"):
            norm_linear(x, r, norm_w, 1e-6, weight[:, :8], b)
        with pytest.raises(ValueError, match="glu needs an even number of weight rows"):
            norm_linear(x, r, norm_w, 1e-6, weight[:5], None, glu=True)
        with pytest.raises(ValueError, match="residual must be contiguous"):
            norm_linear(x, r[:1], norm_w, 1e-6, weight, b)
        with pytest.raises(ValueError, match="bias must be \\[6\\]"):
            norm_linear(x, r, norm_w, 1e-6, weight, b[:3])


@pytest.mark.parametrize("tiles", [Tiles(1, 8, 64, 4, 2), Tiles(4, 4, 128, 4, 3)])
@pytest.mark.parametrize("glu", [False, True])
def test_row_tiles_under_sixteen_rows_give_the_same_numbers(tiles, glu):
    """Row tiles of fewer than 16 rows (the GEMV tiles bench/tune_decode.py times; tile_dot sums
    their products on the CUDA cores) against float64, rows spanning several row tiles and a
    partial K tile."""
    x, r, norm_w, weight, b = inputs(5, 150, 20, torch.bfloat16, True, True, glu, seed=3)
    with use_backend("triton"):
        y, total = launch(x, r, norm_w, 1e-6, weight, b, glu, tiles)
    as64 = [t.double() for t in (x, r, norm_w, weight, b)]
    y64, total64 = reference.norm_linear(*as64[:3], 1e-6, *as64[3:], glu)
    assert_close(y, y64, atol=6 * ULP[torch.bfloat16], rtol=6 * ULP[torch.bfloat16],
                 name=f"norm_linear at {tiles}")
    with use_backend("triton"):
        assert torch.equal(total, rms_norm(x, norm_w, 1e-6, r)[1])


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4])
def test_the_decode_projections_on_a_gpu_match_float64(rows):
    """At Qwen2.5-0.5B's decode shapes in bf16, on the GPU (the `gpu` tests of a visit): one row's
    GEMV (tile_dot's sums on the CUDA cores, the branch no interpreter run takes) and 4 rows'
    tensor-core tiles, for q/k/v with its bias, gate/up with SiLU * up, and o's and down's shapes."""
    for k, n, bias, glu in ((896, 1152, True, False), (896, 4864, False, True),
                            (896, 896, False, False), (4864, 896, False, False)):
        x, r, norm_w, weight, b = inputs(rows, k, n, torch.bfloat16, True, bias, glu, seed=k + n)
        y, _ = norm_linear(x, r, norm_w, 1e-6, weight, b, glu)
        as64 = [t.double() if t is not None else None for t in (x, r, norm_w, weight, b)]
        y64, _ = reference.norm_linear(*as64[:3], 1e-6, *as64[3:], glu)
        tol = 6 * ULP[torch.bfloat16]
        assert_close(y, y64, atol=tol, rtol=tol, name=f"norm_linear {rows}x{k}->{n} glu={glu}")
