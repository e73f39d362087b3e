"""Triton kernels of the LM head with the log-softmax in the GEMM: logits are made a [BLOCK_M,
BLOCK_N] tile at a time in registers (hidden rows times weight rows, fp32 accumulators) and used
there, never written in forward, written once as their gradient in backward.

    forward   _lse_partials_kernel  grid (row tiles, vocabulary splits): each program walks its
    split
              of the vocabulary tile by tile, folding every tile into per-row (max, sum exp, entropy
              sum) states and picking the label's logit; writes the states per (split, row)
              _lse_combine_kernel   grid (rows): the splits' states merged into logp, entropy, lse
    backward  _logit_grad_kernel    grid (row tiles, vocabulary tiles of a chunk): the chunk's
    logits
              remade the same way, turned into d loss / d logits in registers, stored once

The host side (buffers, tiles, the cuBLAS gradient GEMMs) is linear_logprobs.py.
"""
from __future__ import annotations

from .logprobs import logit_grad
from ..online_softmax import lanes_reduce, rows_fold, safe_shift
from ..tile_dot import dot_nt
from ..triton_compat import tl, triton

# Per (split, row): max, sum exp, entropy sum, the label's logit. A plane (splits x N) stays far
# below 2**31 / N_STATES elements, so int32 offsets suffice: rows beyond 2 x SMs row tiles (~34k on
# an H100) get one split, a plane of N.
N_STATES = 4


@triton.jit
def _logits_tile(h_ptr, w_ptr, bias_ptr, rows, cols, row_ok, col_ok, inv_temperature,
                 K: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scaled logits (hidden[rows] @ weight[cols].T + bias[cols]) / T [BLOCK_M, BLOCK_N] fp32;
    -inf in columns past the vocabulary (rows past N are 0: they are never stored)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        a = tl.load(h_ptr + rows[:, None] * K + (k0 + kk)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * K + (k0 + kk)[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = dot_nt(a, w, acc, INTERPRETED)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_temperature, float("-inf"))


@triton.jit
def _lse_partials_kernel(
    h_ptr,        # [N, K] contiguous
    w_ptr,        # [V, K] contiguous, hidden's dtype
    bias_ptr,     # [V] (read only if HAS_BIAS)
    labels_ptr,   # [N] int32/int64
    states_ptr,   # [N_STATES, n_splits, N] fp32 out
    n_rows, n_vocab,
    split_cols,   # vocabulary columns per split, a multiple of BLOCK_N
    inv_temperature, ignore_index,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ENTROPY: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # program_id(0) varies fastest, so the programs running together are the row tiles of one split:
    # they walk the same weight tiles at about the same time, which then come from L2.
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    # A tile of ignored rows (a prompt) computes nothing; the combine writes its zeros.
    if tl.sum((labels != ignore_index).to(tl.int32), axis=0) > 0:
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_M], dtype=tl.float32)
        t = tl.zeros([BLOCK_M], dtype=tl.float32)
        z_label = tl.zeros([BLOCK_M], dtype=tl.float32)
        begin = split * split_cols
        end = tl.minimum(begin + split_cols, n_vocab)
        for v0 in range(begin, end, BLOCK_N):
            cols = v0 + tl.arange(0, BLOCK_N)
            z = _logits_tile(h_ptr, w_ptr, bias_ptr, rows, cols, row_ok, cols < end,
                             inv_temperature, K, HAS_BIAS, INTERPRETED, BLOCK_M, BLOCK_N, BLOCK_K)
            m, s, t = rows_fold(m, s, t, z, HAS_ENTROPY)
            z_label += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
        at = split * n_rows + rows
        plane = tl.num_programs(1) * n_rows
        tl.store(states_ptr + at, m, mask=row_ok)
        tl.store(states_ptr + plane + at, s, mask=row_ok)
        tl.store(states_ptr + 2 * plane + at, t, mask=row_ok)
        tl.store(states_ptr + 3 * plane + at, z_label, mask=row_ok)


@triton.jit
def _lse_combine_kernel(
    states_ptr,   # [N_STATES, n_splits, N] fp32 from _lse_partials_kernel
    labels_ptr,   # [N]
    logp_ptr, entropy_ptr, lse_ptr,  # [N] fp32 out (entropy written only if HAS_ENTROPY)
    n_rows, n_splits, n_vocab, ignore_index,
    HAS_ENTROPY: tl.constexpr, SPLITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    logp = 0.0
    lse = 0.0
    entropy = 0.0
    if label != ignore_index:
        splits = tl.arange(0, SPLITS)
        ok = splits < n_splits
        at = splits * n_rows + row
        plane = n_splits * n_rows
        m = tl.load(states_ptr + at, mask=ok, other=float("-inf"))
        s = tl.load(states_ptr + plane + at, mask=ok, other=0.0)
        t = tl.load(states_ptr + 2 * plane + at, mask=ok, other=0.0)
        z_label = tl.sum(tl.load(states_ptr + 3 * plane + at, mask=ok, other=0.0), axis=0)
        m, s, t = lanes_reduce(m, s, t, HAS_ENTROPY)
        lse = safe_shift(m) + tl.log(s)
        # An out-of-vocabulary label (possible only when the host checks were skipped) gives NaN.
        logp = tl.where((label >= 0) & (label < n_vocab), z_label - lse, float("nan"))
        entropy = tl.log(s) - t / s
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + row, entropy)


@triton.jit
# [N, n_cols] out, hidden's dtype, contiguous: d loss / d logits of the chunk
def _logit_grad_kernel(
    h_ptr, w_ptr, bias_ptr,  # as in forward; w_ptr and bias_ptr at the chunk's first column
    labels_ptr,              # [N]
    lse_ptr,                 # [N] fp32 from forward
    entropy_ptr,             # [N] fp32 from forward (read only if HAS_ENTROPY_GRAD)
    grad_logp_ptr,           # [N] fp32
    grad_entropy_ptr,        # [N] fp32 (read only if HAS_ENTROPY_GRAD)
    grad_ptr,
    n_rows, n_cols,          # N and the chunk's columns
    label_offset,            # the vocabulary column of the chunk's first column
    inv_temperature, ignore_index,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # program_id(0) (rows) varies fastest: the programs running together share a weight tile.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    live = row_ok & (labels != ignore_index)
    out = grad_ptr + rows[:, None] * n_cols + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if tl.sum(live.to(tl.int32), axis=0) > 0:
        z = _logits_tile(h_ptr, w_ptr, bias_ptr, rows, cols, row_ok, col_ok, inv_temperature,
                         K, HAS_BIAS, INTERPRETED, BLOCK_M, BLOCK_N, BLOCK_K)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g_logp = tl.load(grad_logp_ptr + rows, mask=row_ok, other=0.0)
        entropy = lse
        g_entropy = g_logp
        if HAS_ENTROPY_GRAD:
            entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
            g_entropy = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0)
        is_label = (cols[None, :] + label_offset) == labels[:, None]
        grad_z = logit_grad(z, is_label, lse[:, None], g_logp[:, None], entropy[:, None],
                            g_entropy[:, None], HAS_ENTROPY_GRAD)
        grad = tl.where(live[:, None], grad_z * inv_temperature, 0.0)
        tl.store(out, grad.to(grad_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.store(out, tl.zeros([BLOCK_M, BLOCK_N], dtype=grad_ptr.dtype.element_ty), mask=out_ok)
