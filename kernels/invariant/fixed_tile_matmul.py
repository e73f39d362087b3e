"""The batch-invariant mode's matmul on GPUs: one Triton kernel with fixed tiles and a split of K
that depends on K only.

Each program computes a [BLOCK_M, BLOCK_N] tile of x @ W.T over one piece of K (pieces of SPLIT_K,
from 0 upward), walking it in BLOCK_K steps and accumulating in fp32 with `tl.dot`. When K holds
more than one piece, the pieces' fp32 partial tiles are summed by a second kernel, piece 0 first,
piece 1 next, and so on. An output element is then one fixed sequence of instructions over its own
row of x and row of W: the tiles, warps, stages and the split are constants or functions of K (no
autotune, no choice by the number of rows), and the row count N is not specialized on, so the
element's value does not depend on how many rows there are or where its row sits. The split exists
for the decode step: at batch 1 a [1, K] @ [K, O] product is O / BLOCK_N tiles, too few to keep an
H100 busy over a long K (the MLP's down projection) without cutting K. fp32 inputs multiply in IEEE
fp32 (not TF32), like the default path of an fp32 model.

Not yet run on a GPU: there the invariance rests on the tensor cores reducing each output over its
own operands in a fixed order wherever its row sits in the tile (tests/kernels/invariant/
test_invariant_matmul.py checks exactly that on CUDA). Under the Triton interpreter (CPU tensors)
the tile product is an explicit per-element sum instead of numpy's matmul (see the kernel).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..triton_compat import tl, triton
from ..direct_ops import direct_op

# Fixed for every call: changing any of them changes the rounding of every output.
BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 32, 64, 64, 4, 3
# K per piece (a multiple of BLOCK_K): K <= SPLIT_K is one piece, written directly with the bias.
SPLIT_K = 1024
# Partial tiles held at once when K is split, in fp32 elements (256 MiB): more rows run in pieces.
PARTIAL_ELEMENTS = 1 << 26
# Output elements per program of the kernel that sums the pieces.
SUM_BLOCK = 1024


@triton.jit(do_not_specialize=["n_rows"])
# [N, O] contiguous; or fp32 partial tiles when PARTIAL: piece p's [N, O] at p * piece_stride
def _fixed_tile_linear_kernel(
    x_ptr,  # [N, K], unit stride in K
    w_ptr,  # [O, K], unit stride in K
    bias_ptr,  # [O] or a dummy
    out_ptr,
    n_rows, n_out, k_dim,
    x_row_stride, w_row_stride,
    piece_stride,  # a multiple of 16 >= N * O
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    PARTIAL: tl.constexpr,  # K is split: write this piece's fp32 tile, no bias
    INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    piece = tl.program_id(2)
    k_end = tl.minimum(k_dim, piece * SPLIT_K + SPLIT_K)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(piece * SPLIT_K, k_end, BLOCK_K):
        k = k0 + ks
        a = tl.load(x_ptr + rows[:, None] * x_row_stride + k[None, :],
                    mask=(rows[:, None] < n_rows) & (k[None, :] < k_end), other=0.0)
        b = tl.load(w_ptr + cols[None, :] * w_row_stride + k[:, None],
                    mask=(cols[None, :] < n_out) & (k[:, None] < k_end), other=0.0)
        if INTERPRETED:
            # The interpreter's tl.dot is numpy's matmul: it mishandles 16-bit floats, and BLAS
            # micro-kernels round a row differently by its position in the tile. Products (exact in
            # fp32 for 16-bit inputs) summed over the K tile per element stand in for the mma.
            acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        elif IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    out_mask = (rows[:, None] < n_rows) & (cols[None, :] < n_out)
    if PARTIAL:
        tl.store(out_ptr + piece * piece_stride + rows[:, None] * n_out + cols[None, :], acc,
                 mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < n_out, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * n_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=out_mask)


@triton.jit(do_not_specialize=["n_rows"])
def _sum_pieces_kernel(
    partial_ptr,  # fp32: piece p's [N, O] at p * piece_stride
    bias_ptr,  # [O] or a dummy
    out_ptr,  # [N, O] contiguous
    n_rows,  # N
    n_out,  # O
    piece_stride,  # a multiple of 16 >= N * O: every piece's loads as aligned as piece 0's
    PIECES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # N * O keeps O's divisibility, so the bound is uniform over 16-element groups and the accesses
    # stay wide whatever N is (not specialized on).
    n_elements = n_rows * n_out
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    acc = tl.load(partial_ptr + offs, mask=mask, other=0.0)
    for piece in tl.static_range(1, PIECES):  # in piece order, one add each
        acc += tl.load(partial_ptr + piece * piece_stride + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % n_out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def linear_fixed_tiles(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [N, K] @ weight [O, K].T (+ bias [O]) -> [N, O] in out_dtype (default x's), accumulated in
    fp32 and rounded once, by the fixed-tile kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1).
    x and weight of different dtypes are both taken in fp32."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_fixed_tiles: expected x [N, K] and weight [O, K], got x {tuple(x.shape)} "
            f"and weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(
            f"linear_fixed_tiles: bias {tuple(bias.shape)} must be [{weight.shape[0]}]")
    dtype = out_dtype or x.dtype
    if x.dtype != weight.dtype:
        x, weight = x.float(), weight.float()
    # Unit stride in K; contiguous() is a no-op for the engine's activations and weights.
    return _fixed_tile_linear_op(x.contiguous(), weight.contiguous(), bias, dtype)


@direct_op("fusedrl::fixed_tile_linear", mutates_args=())
def _fixed_tile_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          out_dtype: torch.dtype) -> torch.Tensor:
    (n, k), o = x.shape, weight.shape[0]
    out = torch.empty(n, o, dtype=out_dtype, device=x.device)
    if out.numel() == 0 or k == 0:  # nothing to launch: an empty product is 0 (+ bias)
        return out.copy_(bias.float().expand(n, o)) if bias is not None and k == 0 else out.zero_()
    pieces = triton.cdiv(k, SPLIT_K)
    launch = dict(HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, PARTIAL=pieces > 1,
                  INTERPRETED=not x.is_cuda, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                  SPLIT_K=SPLIT_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    bias_arg = bias if bias is not None else weight
    if pieces == 1:
        _fixed_tile_linear_kernel[(triton.cdiv(n, BLOCK_M), triton.cdiv(o, BLOCK_N), 1)](
            x, weight, bias_arg, out, n, o, k, x.stride(0), weight.stride(0), 16, **launch)
        return out
    # Rows in whole tiles per piece of rows: each piece's pointers stay as aligned as the whole's.
    step = max(BLOCK_M, PARTIAL_ELEMENTS // (pieces * o) // BLOCK_M * BLOCK_M)
    piece_stride = triton.cdiv(min(n, step) * o, 16) * 16
    partial = torch.empty(pieces * piece_stride, dtype=torch.float32, device=x.device)
    for begin in range(0, n, step):
        rows = min(step, n - begin)
        _fixed_tile_linear_kernel[(triton.cdiv(rows, BLOCK_M), triton.cdiv(o, BLOCK_N), pieces)](
            x[begin:], weight, bias_arg, partial, rows, o, k, x.stride(0), weight.stride(0),
            piece_stride, **launch)
        _sum_pieces_kernel[(triton.cdiv(rows * o, SUM_BLOCK),)](
            partial, bias_arg, out[begin:], rows, o, piece_stride, PIECES=pieces,
            HAS_BIAS=bias is not None, BLOCK=SUM_BLOCK)
    return out


@_fixed_tile_linear_op.register_fake
def _fixed_tile_linear_fake(x, weight, bias, out_dtype):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=out_dtype)
