"""Triton kernels of the distillation divergence with both LM heads in the GEMM: each program makes
a [BLOCK_M, BLOCK_N] tile of the student's and of the teacher's scaled logits in registers
(linear_logprobs_kernels' _logits_tile, each head with its own width K) and folds them into per-row
states; no logits are written in forward, the student's logit gradient once in backward.

    forward  _stats_kernel     grid (row tiles, vocabulary splits): per (split, row) the student's
                               (max, sum exp, entropy sum), the teacher's (max, sum exp) and the
                               cross sum the KL needs (beta 0: sum e_t (zt - zs); 1: sum e_s (zs -
                               zt)); the host merges the splits into log-sum-exps and the KL
             _jsd_kernel       grid (row tiles, splits), 0 < beta < 1 only: with both log-sum-exps
                               known, per (split, row) the JSD's and KL(p_s || m)'s partial sums
    backward _logit_grad_kernel grid (row tiles, vocabulary tiles of a chunk): d divergence / d zs
                               remade in registers, times the upstream gradient, stored once

The host side (buffers, splits, the head's gradient GEMMs) is distill.py.
"""
from __future__ import annotations

from ..online_softmax import rows_fold, safe_shift
from ..triton_compat import tl, triton
from .linear_logprobs_kernels import _logits_tile

# Per (split, row): the student's max, sum exp and entropy sum, the teacher's max and sum exp,
# the cross sum.
N_STATS = 6
# Per row, what the second pass and backward read: each head's log-sum-exp as (max, log sum exp),
# student then teacher. Kept apart so that log p = (z - max) - log sum exp is exact for the
# largest logit: max + log sum exp rounds at |max|'s scale (6e-5 at logits of 1000 in fp32),
# which a one-hot distribution's log p would inherit.
NORMS = 4


@triton.jit
def _both_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok, col_ok,
                inv_s, inv_t, K_S: tl.constexpr, K_T: tl.constexpr, HAS_S_BIAS: tl.constexpr,
                HAS_T_BIAS: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(zs, zt) [BLOCK_M, BLOCK_N] fp32: both heads' scaled logits, -inf past the vocabulary."""
    zs = _logits_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, row_ok, col_ok, inv_s, K_S, HAS_S_BIAS,
                      INTERPRETED, BLOCK_M, BLOCK_N, BLOCK_K)
    zt = _logits_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok, col_ok, inv_t, K_T, HAS_T_BIAS,
                      INTERPRETED, BLOCK_M, BLOCK_N, BLOCK_K)
    return zs, zt


@triton.jit
def _row_tile(valid_ptr, n_rows, BLOCK_M: tl.constexpr):
    """(rows [BLOCK_M] int64, rows < N, whether any of them is valid) of this program's row tile,
    program_id(0): it varies fastest, so the programs running together walk the same weight
    tiles."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    live = row_ok & (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0)
    return rows, row_ok, tl.sum(live.to(tl.int32), axis=0) > 0


@triton.jit
def _log_probs(zs, zt, norms_ptr, rows, row_ok, n_rows):
    """(log p_s, log p_t) [BLOCK_M, BLOCK_N] of both heads' scaled logits, from NORMS."""
    shift_s = tl.load(norms_ptr + rows, mask=row_ok, other=0.0)
    log_sum_s = tl.load(norms_ptr + n_rows + rows, mask=row_ok, other=0.0)
    shift_t = tl.load(norms_ptr + 2 * n_rows + rows, mask=row_ok, other=0.0)
    log_sum_t = tl.load(norms_ptr + 3 * n_rows + rows, mask=row_ok, other=0.0)
    return ((zs - shift_s[:, None]) - log_sum_s[:, None],
            (zt - shift_t[:, None]) - log_sum_t[:, None])


@triton.jit
def _log_mixture(log_ps, log_pt, beta):
    """log((1 - beta) p_s + beta p_t), elementwise; -inf where both are 0."""
    a = log_ps + tl.log(1.0 - beta)
    b = log_pt + tl.log(beta)
    top = tl.maximum(a, b)
    return safe_shift(top) + tl.log(tl.exp(a - safe_shift(top)) + tl.exp(b - safe_shift(top)))


@triton.jit
def _plogratio(log_p, log_q):
    """p (log p - log q), 0 where p is 0 (a -inf log p, or one that underflows)."""
    p = tl.exp(log_p)
    return tl.where(p > 0, p * (log_p - log_q), 0.0)


@triton.jit
def _stats_kernel(
    hs_ptr, ws_ptr, bs_ptr,   # student: hidden [N, K_S], head [V, K_S], bias [V] (if HAS_S_BIAS)
    ht_ptr, wt_ptr, bt_ptr,   # teacher: hidden [N, K_T], head [V, K_T], bias [V] (if HAS_T_BIAS)
    valid_ptr,                # [N] int8, nonzero = the row counts
    stats_ptr,                # [N_STATS, n_splits, N] fp32 out
    n_rows, n_vocab,
    split_cols,               # vocabulary columns per split, a multiple of BLOCK_N
    inv_s, inv_t,             # each head's logit_scale / temperature
    K_S: tl.constexpr, K_T: tl.constexpr, HAS_S_BIAS: tl.constexpr, HAS_T_BIAS: tl.constexpr,
    TEACHER_WEIGHTED: tl.constexpr,  # the cross sum under the teacher's weights (beta = 0)
    INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows, row_ok, any_live = _row_tile(valid_ptr, n_rows, BLOCK_M)
    split = tl.program_id(1)
    # A tile of masked rows (a prompt) computes nothing: the host zeroes its rows' results.
    if any_live:
        m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s_s = tl.zeros([BLOCK_M], dtype=tl.float32)
        t_s = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s_t = tl.zeros([BLOCK_M], dtype=tl.float32)
        cross = tl.zeros([BLOCK_M], dtype=tl.float32)
        begin = split * split_cols
        end = tl.minimum(begin + split_cols, n_vocab)
        for v0 in range(begin, end, BLOCK_N):
            cols = v0 + tl.arange(0, BLOCK_N)
            col_ok = cols < end
            zs, zt = _both_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, rows, cols,
                                 row_ok, col_ok, inv_s, inv_t, K_S, K_T, HAS_S_BIAS, HAS_T_BIAS,
                                 INTERPRETED, BLOCK_M, BLOCK_N, BLOCK_K)
            # The cross sum rides on one head's running max: rescaled as that head's sum is.
            if TEACHER_WEIGHTED:
                shift = safe_shift(tl.maximum(m_t, tl.max(zt, axis=1)))
                e = tl.exp(zt - shift[:, None])
                cross = cross * tl.exp(m_t - shift) + \
                    tl.sum(tl.where(e > 0, e * (zt - zs), 0.0), axis=1)
            else:
                shift = safe_shift(tl.maximum(m_s, tl.max(zs, axis=1)))
                e = tl.exp(zs - shift[:, None])
                cross = cross * tl.exp(m_s - shift) + \
                    tl.sum(tl.where(e > 0, e * (zs - zt), 0.0), axis=1)
            m_s, s_s, t_s = rows_fold(m_s, s_s, t_s, zs, True)
            m_t, s_t, _ = rows_fold(m_t, s_t, s_t, zt, False)
        at = split * n_rows + rows
        plane = tl.num_programs(1) * n_rows
        tl.store(stats_ptr + at, m_s, mask=row_ok)
        tl.store(stats_ptr + plane + at, s_s, mask=row_ok)
        tl.store(stats_ptr + 2 * plane + at, t_s, mask=row_ok)
        tl.store(stats_ptr + 3 * plane + at, m_t, mask=row_ok)
        tl.store(stats_ptr + 4 * plane + at, s_t, mask=row_ok)
        tl.store(stats_ptr + 5 * plane + at, cross, mask=row_ok)


@triton.jit
def _jsd_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, valid_ptr,  # as _stats_kernel's
    norms_ptr,                # [4, N] fp32: NORMS (both heads' log-sum-exps, split in two)
    out_ptr,                  # [2, n_splits, N] fp32 out: the JSD's and KL(p_s || m)'s sums
    n_rows, n_vocab, split_cols, inv_s, inv_t, beta,
    K_S: tl.constexpr, K_T: tl.constexpr, HAS_S_BIAS: tl.constexpr, HAS_T_BIAS: tl.constexpr,
    INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows, row_ok, any_live = _row_tile(valid_ptr, n_rows, BLOCK_M)
    split = tl.program_id(1)
    if any_live:
        jsd = tl.zeros([BLOCK_M], dtype=tl.float32)
        kl_s = tl.zeros([BLOCK_M], dtype=tl.float32)
        begin = split * split_cols
        end = tl.minimum(begin + split_cols, n_vocab)
        for v0 in range(begin, end, BLOCK_N):
            cols = v0 + tl.arange(0, BLOCK_N)
            zs, zt = _both_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, rows, cols,
                                 row_ok, cols < end, inv_s, inv_t, K_S, K_T, HAS_S_BIAS,
                                 HAS_T_BIAS, INTERPRETED, BLOCK_M, BLOCK_N, BLOCK_K)
            log_ps, log_pt = _log_probs(zs, zt, norms_ptr, rows, row_ok, n_rows)
            log_m = _log_mixture(log_ps, log_pt, beta)
            student = _plogratio(log_ps, log_m)
            jsd += tl.sum(beta * _plogratio(log_pt, log_m) + (1.0 - beta) * student, axis=1)
            kl_s += tl.sum(student, axis=1)
        at = split * n_rows + rows
        tl.store(out_ptr + at, jsd, mask=row_ok)
        tl.store(out_ptr + tl.num_programs(1) * n_rows + at, kl_s, mask=row_ok)


@triton.jit
def _logit_grad_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr,  # as _stats_kernel's, the heads (and
                                                     # biases) at the chunk's first column
    norms_ptr,                # [4, N] fp32: NORMS
    aux_ptr,                  # [N] fp32: E_ps[zs - zt] (MODE 1) or KL(p_s || m) (MODE 2)
    grad_div_ptr,             # [N] fp32 upstream gradient, 0 on masked rows
    grad_ptr,                 # [N, n_cols] out, the student hidden's dtype
    n_rows, n_cols, inv_s, inv_t, beta,
    K_S: tl.constexpr, K_T: tl.constexpr, HAS_S_BIAS: tl.constexpr, HAS_T_BIAS: tl.constexpr,
    MODE: tl.constexpr,       # 0: forward KL (beta 0), 1: reverse KL (beta 1), 2: the JSD
    INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    g = tl.load(grad_div_ptr + rows, mask=row_ok, other=0.0)
    out = grad_ptr + rows[:, None] * n_cols + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if tl.sum((g != 0).to(tl.int32), axis=0) > 0:
        zs, zt = _both_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok,
                             col_ok, inv_s, inv_t, K_S, K_T, HAS_S_BIAS, HAS_T_BIAS, INTERPRETED,
                             BLOCK_M, BLOCK_N, BLOCK_K)
        log_ps, log_pt = _log_probs(zs, zt, norms_ptr, rows, row_ok, n_rows)
        aux = tl.load(aux_ptr + rows, mask=row_ok, other=0.0)[:, None]
        p_s = tl.exp(log_ps)
        # d/dzs of each divergence (the JSD's terms through m cancel but for p_s's own):
        if MODE == 0:
            grad_z = p_s - tl.exp(log_pt)
        elif MODE == 1:
            # p_s (log p_s - log p_t - KL) with the log-sum-exps cancelled: aux = E_ps[zs - zt]
            grad_z = tl.where(p_s > 0, p_s * ((zs - zt) - aux), 0.0)
        else:
            grad_z = (1.0 - beta) * tl.where(
                p_s > 0, p_s * (log_ps - _log_mixture(log_ps, log_pt, beta) - aux), 0.0)
        grad = tl.where(out_ok, grad_z * (g * inv_s)[:, None], 0.0)
        tl.store(out, grad.to(grad_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.store(out, tl.zeros([BLOCK_M, BLOCK_N], dtype=grad_ptr.dtype.element_ty), mask=out_ok)
