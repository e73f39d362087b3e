"""The mixture-of-experts grouped GEMM in Triton, forward and backward, for where torch's
`F.grouped_mm` would read the group offsets on the host (dispatch.grouped_gemm_path).

    out [R, N] = rows of group e of a [R, K] times b[e]^T, b [E, N, K]; group e holds the rows
    [offsets[e-1], offsets[e]) (offsets [E] int32, moe_sort's end rows, offsets[-1] == R)

Torch 2.11's grouped_mm runs its CUTLASS kernel only for bf16 on sm_90/sm_100; anything else (fp32,
fp16, an A100) takes a fallback that copies `offs` to the host: a sync per call, and a failure
inside CUDA-graph capture. Here the groups are read by the kernels themselves:

- `_grouped_rows_kernel` [row tiles, N tiles]: a tile of BLOCK_M sorted rows finds the groups it
  spans from the offsets (a count, no search) and, for each, multiplies its rows of that group by
  that expert's weight tile. A decode step's few rows spread over many experts read each chosen
  expert's weight tile once; a tile inside one group does one product, as a plain GEMM. The input
  gradient is the same kernel on the gradient and b transposed (strides, no copy).
- `_grouped_weight_grad_kernel` [E, N tiles, K tiles]: grad_b[e] = g[rows of e]^T @ a[rows of e],
  a loop over the group's rows (an empty group writes zeros).

Products accumulate in fp32 (fp32 inputs in full fp32, as torch's matmul: tile_dot.dot_nt); the
outputs are in the inputs' dtype. Custom ops fusedrl::grouped_gemm_rows and
fusedrl::grouped_gemm_weight_grad; `grouped_gemm` is the differentiable entry
(moe_gemm.grouped_linear calls it).
"""
from __future__ import annotations

import torch

from ..tile_dot import dot_nt
from ..triton_compat import tl, triton
from ..direct_ops import direct_op

# Tile sizes: 16 rows (tl.dot's least M; a decode step has T * k rows), 64 output columns, 32 of the
# reduction: two fp32 [64, 32] operand tiles stay in registers at 4 warps (no spill on sm_80/sm_90).
BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 32
# The weight gradient's row loop: 32 rows of the group per step.
BLOCK_ROWS = 32


@triton.jit
def _grouped_rows_kernel(
    a_ptr,  # [R, K] rows sorted by group
    b_ptr,  # [E, N, K] (any strides)
    out_ptr,  # [R, N] out, the inputs' dtype
    offsets_ptr,  # [E] int32: each group's end row
    R, N, K, E,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    tile_start = tl.program_id(0) * BLOCK_M
    rows = tile_start + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    experts = tl.arange(0, BLOCK_E)
    ends = tl.load(offsets_ptr + experts, mask=experts < E, other=2147483647)
    # Row r is in group #(ends <= r): the tile's first and last rows bound the groups it spans.
    tile_last = tl.minimum(tile_start + BLOCK_M, R) - 1
    first_group = tl.sum((ends <= tile_start).to(tl.int32))
    last_group = tl.minimum(tl.sum((ends <= tile_last).to(tl.int32)), E - 1)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    for group in range(first_group, last_group + 1):
        start = tl.load(offsets_ptr + group - 1, mask=group > 0, other=0)
        end = tl.load(offsets_ptr + group)
        if end > start:  # the empty groups between a tile's rows read no weights
            mine = (rows >= start) & (rows < end)
            b_rows = (b_ptr + tl.cast(stride_be, tl.int64) * group
                      + cols.to(tl.int64)[:, None] * stride_bn)
            col_ok = cols[:, None] < N
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks[None, :] < K
                a = tl.load(a_rows + ks[None, :] * stride_ak, mask=mine[:, None] & k_ok, other=0.0)
                b = tl.load(b_rows + ks[None, :] * stride_bk, mask=col_ok & k_ok, other=0.0)
                acc = dot_nt(a, b, acc, INTERPRETED)
            out_ok = mine[:, None] & (cols[None, :] < N)
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _grouped_weight_grad_kernel(
    g_ptr,  # [R, N] contiguous: the output's gradient
    a_ptr,  # [R, K] contiguous: the forward's input
    grad_b_ptr,  # [E, N, K] contiguous out, the inputs' dtype
    offsets_ptr,  # [E] int32: each group's end row
    N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    start = tl.load(offsets_ptr + group - 1, mask=group > 0, other=0)
    end = tl.load(offsets_ptr + group)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        live = rows < end
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :],
                    mask=live[:, None] & (cols[None, :] < N), other=0.0)  # [ROWS, N]
        a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :],
                    mask=live[:, None] & (ks[None, :] < K), other=0.0)  # [ROWS, K]
        acc = dot_nt(tl.trans(g), tl.trans(a), acc, INTERPRETED)
    out = grad_b_ptr + group.to(tl.int64) * N * K + cols.to(tl.int64)[:, None] * K + ks[None, :]
    tl.store(out, acc.to(grad_b_ptr.dtype.element_ty), mask=(cols[:, None] < N) & (ks[None, :] < K))


def _rows_product(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """a [R, K], b [E, N, K] any strides -> [R, N] (the forward; the input gradient with b^T)."""
    rows, experts, n_out, n_in = a.shape[0], b.shape[0], b.shape[1], b.shape[2]
    out = a.new_empty(rows, n_out)
    if out.numel():
        grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(n_out, BLOCK_N))
        _grouped_rows_kernel[grid](a, b, out, offsets, rows, n_out, n_in, experts,
                                   a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
                                   BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                   BLOCK_E=triton.next_power_of_2(experts),
                                   INTERPRETED=not a.is_cuda)
    return out


@direct_op("fusedrl::grouped_gemm_rows", mutates_args=())
def _rows_op(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _rows_product(a, b, offsets)


@_rows_op.register_fake
def _rows_fake(a, b, offsets):
    return a.new_empty(a.shape[0], b.shape[1])


@direct_op("fusedrl::grouped_gemm_weight_grad", mutates_args=())
def _weight_grad_op(grad_out: torch.Tensor, a: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    experts, n_out, n_in = offsets.shape[0], grad_out.shape[1], a.shape[1]
    grad_b = a.new_empty(experts, n_out, n_in)
    if grad_b.numel():
        grid = (experts, triton.cdiv(n_out, BLOCK_N), triton.cdiv(n_in, BLOCK_K))
        _grouped_weight_grad_kernel[grid](grad_out, a, grad_b, offsets, n_out, n_in,
                                          BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_ROWS=BLOCK_ROWS,
                                          INTERPRETED=not a.is_cuda)
    return grad_b


@_weight_grad_op.register_fake
def _weight_grad_fake(grad_out, a, offsets):
    return a.new_empty(offsets.shape[0], grad_out.shape[1], a.shape[1])


def _setup(ctx, inputs, output):
    a, b, offsets = inputs
    ctx.save_for_backward(a, b, offsets)


def _backward(ctx, grad_out):
    a, b, offsets = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_a = _rows_op(grad_out, b.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    grad_b = _weight_grad_op(grad_out, a.contiguous(), offsets) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_rows_op.register_autograd(_backward, setup_context=_setup)


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """a [R, K] rows sorted by group, b [E, N, K], offsets [E] int32 (end rows, offsets[-1] == R)
    -> [R, N]: row r of group e is a[r] @ b[e]^T; differentiable in a and b. Inputs checked by
    the caller (moe_gemm.grouped_linear); CUDA tensors, or CPU ones under TRITON_INTERPRET=1."""
    return _rows_op(a, b, offsets)
