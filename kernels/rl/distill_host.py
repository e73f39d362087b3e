"""Host side of the fused distillation kernels (distill_kernels.py): buffers, vocabulary splits,
the merge of the splits' states, the head's gradient GEMMs, and the two custom ops
(fusedrl::linear_distill_fwd / _bwd) with their autograd.

Forward keeps no logits: one launch folds both heads' tiles into per-(split, row) states, merged
here into each head's log-sum-exp, the student's entropy and (beta 0 or 1) the KL; the generalized
JSD takes a second launch once both log-sum-exps are known. Backward walks the vocabulary in
chunks as linear_logprobs.py does (head_grads): each chunk's student logit gradient [N, Vc] is
made by one launch that remakes both heads' tiles, then two GEMMs. The extra memory is that chunk
and a few floats per row, whatever V is; the teacher is read, never written, never differentiated.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..triton_compat import triton
from .distill_kernels import NORMS, N_STATS, _jsd_kernel, _logit_grad_kernel, _stats_kernel
from .linear_logprobs import _sm_count, fused_tiles, head_grads, vocab_chunk_size, vocab_splits
from ..direct_ops import direct_op


def divergence_mode(beta: float) -> int:
    """The kernels' MODE: 0 forward KL (beta 0), 1 reverse KL (beta 1), 2 the generalized JSD."""
    return 0 if beta == 0.0 else 1 if beta == 1.0 else 2


def _merge(m, sums, centred=None):
    """Merge per-split states over dim 0: m [S, N] each split's max, ``sums`` [S, N] sums of
    exp(z - m) (times something), ``centred`` a sum of exp(z - m) (z - m). Returns (shift [N],
    the sums rescaled onto it, the centred sum re-centred on it)."""
    top = m.amax(dim=0)
    shift = torch.where(top == float("-inf"), 0.0, top)
    weight = torch.exp(m - shift)                       # 0 for an empty split (m = -inf)
    merged = [(x * weight).sum(dim=0) for x in sums]
    if centred is None:
        return shift, merged, None
    s = sums[0]
    recentred = (weight * (centred + torch.where(s > 0, (m - shift) * s, 0.0))).sum(dim=0)
    return shift, merged, recentred


def _launch_args(hs, ws, bs, ht, wt, bt):
    return dict(K_S=hs.shape[1], K_T=ht.shape[1], HAS_S_BIAS=bs is not None,
                HAS_T_BIAS=bt is not None, INTERPRETED=not hs.is_cuda)


def distill_forward(hs, ws, bs, ht, wt, bt, valid, beta, inv_s, inv_t):
    """(divergence, entropy, aux) [N] fp32 and norms [NORMS, N] fp32 of the student hidden
    hs [N, Ks] through ws [V, Ks] (+ bs) against the teacher ht [N, Kt], wt [V, Kt] (+ bt), each
    head's logits times inv_s / inv_t; divergence and entropy 0 where valid [N] (int8) is 0.
    aux: what backward reads besides the norms (beta 1: E_ps[zs - zt]; the JSD: KL(p_s || m))."""
    n_rows, vocab = hs.shape[0], ws.shape[0]
    if n_rows == 0:
        return (*(hs.new_zeros(0, dtype=torch.float32) for _ in range(3)),
                hs.new_zeros(NORMS, 0, dtype=torch.float32))
    tiles = fused_tiles(n_rows)
    row_tiles = triton.cdiv(n_rows, tiles.block_m)
    n_splits, split_cols = vocab_splits(row_tiles, vocab, _sm_count(hs.device), tiles.block_n)
    mode = divergence_mode(beta)
    launch = dict(_launch_args(hs, ws, bs, ht, wt, bt), BLOCK_M=tiles.block_m,
                  BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps,
                  num_stages=tiles.num_stages)
    heads = (hs, ws, ws if bs is None else bs, ht, wt, wt if bt is None else bt, valid)
    # zeros, not empty: the rows of a masked row tile are never written, and stay finite
    stats = torch.zeros(N_STATS, n_splits, n_rows, dtype=torch.float32, device=hs.device)
    _stats_kernel[(row_tiles, n_splits)](*heads, stats, n_rows, vocab, split_cols, inv_s, inv_t,
                                         TEACHER_WEIGHTED=mode == 0, **launch)
    m_s, s_s, t_s, m_t, s_t, cross = stats.unbind(0)
    shift_s, (sum_s, cross_s), entropy_sum = _merge(m_s, [s_s, cross], t_s)
    shift_t, (sum_t, cross_t), _ = _merge(m_t, [s_t, cross])
    norms = torch.stack([shift_s, torch.log(sum_s), shift_t, torch.log(sum_t)])
    entropy = norms[1] - entropy_sum / sum_s
    # lse_s - lse_t, the two parts apart (see NORMS)
    lse_gap = (shift_s - shift_t) + (norms[1] - norms[3])
    if mode == 0:
        divergence = cross_t / sum_t + lse_gap
        aux = divergence
    elif mode == 1:
        # backward's p_s ((zs - zt) - E_ps[zs - zt]): the mean from the same logits as each
        # term, so a one-hot student gets exactly 0 (not the rounding of two log-sum-exps)
        aux = cross_s / sum_s
        divergence = aux - lse_gap
    else:
        sums = torch.zeros(2, n_splits, n_rows, dtype=torch.float32, device=hs.device)
        _jsd_kernel[(row_tiles, n_splits)](*heads, norms, sums, n_rows, vocab, split_cols,
                                           inv_s, inv_t, beta, **launch)
        divergence, aux = sums.sum(dim=1).unbind(0)
        aux = aux.clone()   # an output of its own, not a view into the sums
    live = valid != 0
    return torch.where(live, divergence, 0.0), torch.where(live, entropy, 0.0), aux, norms


def distill_backward(grad_div, hs, ws, bs, ht, wt, bt, valid, aux, norms, beta, inv_s,
                     inv_t, chunk_size, need_weight_grad):
    """(d hs [N, Ks], d ws [V, Ks] or [0], d bs [V] or [0]) for the upstream gradient grad_div [N]
    of the per-token divergence (masked rows get none), ``chunk_size`` x V logits a chunk."""
    n_rows, vocab = hs.shape[0], ws.shape[0]
    g = torch.where(valid != 0, grad_div.float(), 0.0).contiguous()
    tiles = fused_tiles(n_rows)
    launch = dict(_launch_args(hs, ws, bs, ht, wt, bt), MODE=divergence_mode(beta),
                  BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                  num_warps=tiles.num_warps, num_stages=tiles.num_stages)

    def logit_grad(start, end):
        grad = torch.empty(n_rows, end - start, dtype=hs.dtype, device=hs.device)
        grid = (triton.cdiv(n_rows, tiles.block_m), triton.cdiv(end - start, tiles.block_n))
        _logit_grad_kernel[grid](
            hs, ws[start:end], ws if bs is None else bs[start:end], ht, wt[start:end],
            wt if bt is None else bt[start:end], norms, aux, g, grad, n_rows, end - start,
            inv_s, inv_t, beta, **launch)
        return grad

    return head_grads(hs, ws, bs, vocab_chunk_size(n_rows, vocab, chunk_size), need_weight_grad,
                      logit_grad)


@direct_op("fusedrl::linear_distill_fwd", mutates_args=())
def _fwd_op(hs: torch.Tensor, ws: torch.Tensor, bs: Optional[torch.Tensor], ht: torch.Tensor,
            wt: torch.Tensor, bt: Optional[torch.Tensor], valid: torch.Tensor, beta: float,
            inv_s: float, inv_t: float, chunk_size: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return distill_forward(hs, ws, bs, ht, wt, bt, valid, beta, inv_s, inv_t)


@_fwd_op.register_fake
def _(hs, ws, bs, ht, wt, bt, valid, beta, inv_s, inv_t, chunk_size):
    row = hs.new_empty(hs.shape[0], dtype=torch.float32)
    return row, row.clone(), row.clone(), hs.new_empty(NORMS, hs.shape[0], dtype=torch.float32)


@direct_op("fusedrl::linear_distill_bwd", mutates_args=())
def _bwd_op(grad_div: torch.Tensor, hs: torch.Tensor, ws: torch.Tensor,
            bs: Optional[torch.Tensor], ht: torch.Tensor, wt: torch.Tensor,
            bt: Optional[torch.Tensor], valid: torch.Tensor, aux: torch.Tensor,
            norms: torch.Tensor, beta: float, inv_s: float, inv_t: float,
            chunk_size: int, need_weight_grad: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return distill_backward(grad_div, hs, ws, bs, ht, wt, bt, valid, aux, norms, beta,
                            inv_s, inv_t, chunk_size, need_weight_grad)


@_bwd_op.register_fake
def _(grad_div, hs, ws, bs, ht, wt, bt, valid, aux, norms, beta, inv_s, inv_t,
      chunk_size, need_weight_grad):
    n_weight = ws.shape if need_weight_grad else (0,)
    n_bias = ws.shape[0] if bs is not None and need_weight_grad else 0
    return torch.empty_like(hs), ws.new_empty(n_weight), ws.new_empty(n_bias)


def _setup_context(ctx, inputs, output):
    hs, ws, bs, ht, wt, bt, valid, beta, inv_s, inv_t, chunk_size = inputs
    _, _, aux, norms = output
    ctx.save_for_backward(hs, ws, bs, ht, wt, bt, valid, aux, norms)
    ctx.args = (beta, inv_s, inv_t, chunk_size)
    ctx.has_bias = bs is not None


def _backward(ctx, grad_div, *_unused):
    hs, ws, bs, ht, wt, bt, valid, aux, norms = ctx.saved_tensors
    beta, inv_s, inv_t, chunk_size = ctx.args
    need_weight_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_hidden, grad_weight, grad_bias = _bwd_op(
        grad_div, hs, ws, bs, ht, wt, bt, valid, aux, norms, beta, inv_s, inv_t,
        chunk_size, need_weight_grad)
    return (grad_hidden, grad_weight if need_weight_grad else None,
            grad_bias if ctx.has_bias and need_weight_grad else None) + (None,) * 8


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fused_distill(hs, ws, bs, ht, wt, bt, valid, beta, inv_s, inv_t, chunk_size):
    """(divergence [N], entropy [N]) fp32 from the fused kernels: hs [N, Ks], ws [V, Ks] of one
    dtype, the teacher's likewise, valid [N] bool; differentiable w.r.t. hs, ws and bs. Arguments
    validated by the caller (linear_distill_divergence)."""
    divergence, entropy, _, _ = _fwd_op(
        hs.contiguous(), ws.contiguous(), bs, ht.contiguous(), wt.contiguous(), bt,
        valid.to(torch.int8).contiguous(), float(beta), float(inv_s), float(inv_t),
        int(chunk_size))
    return divergence, entropy.detach()
