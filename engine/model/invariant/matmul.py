"""The batch-invariant mode's matmul on GPUs: one Triton kernel with fixed tiles and no split-K.

Each program computes a [BLOCK_M, BLOCK_N] tile of x @ W.T, walking K from 0 upward in BLOCK_K steps
and accumulating in fp32 with `tl.dot`. An output element is then one fixed sequence of instructions
over its own row of x and row of W: the tile sizes, warps and stages are constants (no autotune, no
choice by the number of rows), K is never split across programs, and the row count N is not
specialized on, so the element's value does not depend on how many rows there are or where its row
sits. That is the property `ops.linear`'s fp32 product trees have on the CPU, at GPU speed: no
[K, rows, out] products are materialized. fp32 inputs multiply in IEEE fp32 (not TF32), like the
default path of an fp32 model.

Not yet run on a GPU: there the invariance rests on the tensor cores reducing each output over its
own operands in a fixed order wherever its row sits in the tile (tests/engine/model/
test_invariant_matmul.py checks exactly that on CUDA). Under the Triton interpreter (CPU tensors)
the tile product is an explicit per-element sum instead of numpy's matmul (see the kernel).
"""
from __future__ import annotations

import torch

from ....kernels.triton_compat import tl, triton

# Fixed for every call: changing any of them changes the rounding of every output.
BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 32, 64, 64, 4, 3


@triton.jit(do_not_specialize=["n_rows"])
def _fixed_tile_linear_kernel(
    x_ptr,  # [N, K], unit stride in K
    w_ptr,  # [O, K], unit stride in K
    bias_ptr,  # [O] or a dummy
    out_ptr,  # [N, O] contiguous
    n_rows, n_out, k_dim,
    x_row_stride, w_row_stride,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        k = k0 + ks
        a = tl.load(x_ptr + rows[:, None] * x_row_stride + k[None, :],
                    mask=(rows[:, None] < n_rows) & (k[None, :] < k_dim), other=0.0)
        b = tl.load(w_ptr + cols[None, :] * w_row_stride + k[:, None],
                    mask=(cols[None, :] < n_out) & (k[:, None] < k_dim), other=0.0)
        if INTERPRETED:
            # The interpreter's tl.dot is numpy's matmul: it mishandles 16-bit floats, and BLAS
            # micro-kernels round a row differently by its position in the tile. Products (exact in
            # fp32 for 16-bit inputs) summed over the K tile per element stand in for the mma.
            acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        elif IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < n_out, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * n_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_out))


def linear_fixed_tiles(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [N, K] @ weight [O, K].T (+ bias [O]) -> [N, O] in out_dtype (default x's), accumulated in
    fp32 and rounded once, by the fixed-tile kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1).
    x and weight of different dtypes are both taken in fp32."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_fixed_tiles: expected x [N, K] and weight [O, K], got x {tuple(x.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear_fixed_tiles: bias {tuple(bias.shape)} must be [{weight.shape[0]}]")
    out = torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    if x.dtype != weight.dtype:
        x, weight = x.float(), weight.float()
    # Unit stride in K; contiguous() is a no-op for the engine's activations and weights.
    x, weight = x.contiguous(), weight.contiguous()
    (n, k), o = x.shape, weight.shape[0]
    if out.numel() == 0 or k == 0:  # nothing to launch: an empty product is 0 (+ bias)
        return out.copy_(bias.float().expand(n, o)) if bias is not None and k == 0 else out.zero_()
    grid = (triton.cdiv(n, BLOCK_M), triton.cdiv(o, BLOCK_N))
    _fixed_tile_linear_kernel[grid](
        x, weight, bias if bias is not None else weight, out, n, o, k, x.stride(0), weight.stride(0),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, INTERPRETED=not x.is_cuda,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out
