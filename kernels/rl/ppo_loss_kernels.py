"""The Triton kernels of PPO's policy and value losses: one launch per row pass, one tiny launch
that finalizes, one launch backward (launches and custom ops in ppo_loss_ops.py, API in
ppo_loss.py).

  forward 1  _policy_rows_kernel / _value_rows_kernel, grid (rows, chunks of a row): per token the
             (unweighted) loss term and its derivative d term / d x, stored for backward; per
             program one row of partial sums (columns below).
  forward 2  _finalize_kernel, one program: reduces the partials, in a fixed order (deterministic),
             into each row's aggregation weight (the rules of aggregation.py, from the rows'
             kept-token counts), the loss sum_b w_b * loss_b and the stats.
  backward   _scaled_grad_kernel: d loss / d x = upstream * w_row * d term / d x, in x's dtype.

Row-level quantities (GSPO's sequence ratio, sequence-level importance weights) need the whole row
before any token's term: the host then runs one program per row, which reads its row twice (the
second read is served from L2 at these row lengths).

The token streams are loaded under the index-range mask and validity is applied with a select, so
the loads vectorize (a data-dependent load mask forces 32-bit accesses).
"""
from __future__ import annotations

from ..triton_compat import tl, triton

# Partial-sum columns written by each program of the row kernels.
N_PARTIALS = 10
(LOSS, COUNT, CLIPPED, DUAL_CLIPPED, KL, RATIO_SUM, RATIO_MAX, VALID, WEIGHT_SUM,
 WEIGHT_MAX) = range(N_PARTIALS)
# Stats written by the finalize kernel, in this order.
STATS = ("clipfrac", "dual_clipfrac", "approx_kl", "ratio_mean", "ratio_max",
         "is_weight_mean", "is_weight_max", "is_masked_frac")
# Importance-sampling modes and aggregations as the kernels number them.
IS_NONE, IS_TIS, IS_MIS = range(3)


@triton.jit
def _load_f32(ptr, offs, in_range, valid):
    return tl.where(valid, tl.load(ptr + offs, mask=in_range, other=0.0).to(tl.float32), 0.0)


@triton.jit
def _block(mask_ptr, row, start, n_steps, HAS_MASK: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """(offsets, in range, valid) of the BLOCK_SIZE steps from `start` of the row at offset `row`:
    valid is in range and, with a mask, mask != 0."""
    t = start + tl.arange(0, BLOCK_SIZE)
    in_range = t < n_steps
    offs = row + t
    valid = in_range
    if HAS_MASK:
        valid = in_range & (tl.load(mask_ptr + offs, mask=in_range, other=0) != 0)
    return offs, in_range, valid


@triton.jit
def _clamped_exp(log_w):
    """exp of a log importance weight clamped to +-20 (statistics.LOG_RATIO_LIMIT)."""
    return tl.exp(tl.minimum(tl.maximum(log_w, -20.0), 20.0))


@triton.jit
def _token_weight(old_logp, rollout_logp, valid):
    """log of pi_old / pi_rollout at one token, 0 where invalid."""
    return tl.where(valid, old_logp - rollout_logp, 0.0)


@triton.jit
def _row_prepass(logp_ptr, old_ptr, rollout_ptr, mask_ptr, row, n_steps, is_low, is_high,
                 HAS_MASK: tl.constexpr, IS_MODE: tl.constexpr, IS_SEQ: tl.constexpr,
                 SEQ_RATIO: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """(the row's summed log importance weight over valid tokens, GSPO's mean log-ratio over the
    tokens the correction keeps) of one row (only what the constexprs ask for is computed)."""
    sum_log_w = tl.zeros([], dtype=tl.float32)
    sum_log_ratio = tl.zeros([], dtype=tl.float32)
    n_kept = tl.zeros([], dtype=tl.float32)
    for start in range(0, n_steps, BLOCK_SIZE):
        offs, in_range, valid = _block(mask_ptr, row, start, n_steps, HAS_MASK, BLOCK_SIZE)
        kept = valid
        if IS_MODE != 0:
            log_w = _token_weight(_load_f32(old_ptr, offs, in_range, valid),
                                  _load_f32(rollout_ptr, offs, in_range, valid), valid)
            sum_log_w += tl.sum(log_w, axis=0)
            if IS_MODE == 2 and not IS_SEQ:
                w = _clamped_exp(log_w)
                kept = valid & (w >= is_low) & (w <= is_high)
        if SEQ_RATIO:
            log_ratio = _load_f32(logp_ptr, offs, in_range, kept) - _load_f32(old_ptr, offs,
                                                                              in_range, kept)
            sum_log_ratio += tl.sum(log_ratio, axis=0)
            n_kept += tl.sum(kept.to(tl.float32), axis=0)
    return sum_log_w, sum_log_ratio / tl.maximum(n_kept, 1.0)


@triton.jit
def _store_partials(partials_ptr, loss, kept, clipped, dual_clipped, kl, ratio_sum, ratio_max,
                    valid, weight_sum, weight_max):
    """One program's partial sums and maxima (columns as in N_PARTIALS above); ratios and weights
    are positive, so 0 is the identity of their max."""
    base = partials_ptr + (
        tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * 10
    tl.store(base + 0, tl.sum(loss, axis=0))
    tl.store(base + 1, tl.sum(kept, axis=0))
    tl.store(base + 2, tl.sum(clipped, axis=0))
    tl.store(base + 3, tl.sum(dual_clipped, axis=0))
    tl.store(base + 4, tl.sum(kl, axis=0))
    tl.store(base + 5, tl.sum(ratio_sum, axis=0))
    tl.store(base + 6, tl.max(ratio_max, axis=0))
    tl.store(base + 7, tl.sum(valid, axis=0))
    tl.store(base + 8, tl.sum(weight_sum, axis=0))
    tl.store(base + 9, tl.max(weight_max, axis=0))


@triton.jit
def _policy_rows_kernel(
    logp_ptr,         # [rows, T] float
    old_ptr,          # [rows, T] float
    adv_ptr,          # [rows, T] float
    mask_ptr,         # [rows, T] uint8/int, nonzero = valid (read only if HAS_MASK)
    rollout_ptr,      # [rows, T] float, the sampler's log-probs (read only if IS_MODE)
    dterm_ptr,        # [rows, T] fp32 out: d term / d logp, 0 where not kept (only if STORE_GRAD)
    partials_ptr,     # [rows, chunks, N_PARTIALS] fp32 out
    n_steps,          # T
    chunk,            # tokens of a row per program (a multiple of BLOCK_SIZE; >= T with ROW_PASS)
    clip_low,         # ratio floor is 1 - clip_low
    clip_high,        # ratio ceiling is 1 + clip_high
    dual_clip,        # bound -A * dual_clip for A < 0 (used only if HAS_DUAL)
    log_ratio_clamp,  # the log-ratio is clamped to +-this before exp()
    is_cap,           # TIS: advantages scaled by min(w, is_cap)
    is_low,           # MIS: tokens (rows) with w outside [is_low, is_high] are dropped
    is_high,
    HAS_MASK: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    IS_MODE: tl.constexpr,    # IS_NONE, IS_TIS, IS_MIS
    IS_SEQ: tl.constexpr,     # importance weight of the whole row (product over its tokens)
    SEQ_RATIO: tl.constexpr,  # GSPO: every token's log-ratio is the row's mean over kept tokens
    STORE_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * n_steps
    first = tl.program_id(1) * chunk
    row_log_w, row_log_ratio = 0.0, 0.0
    if SEQ_RATIO or IS_SEQ:
        row_log_w, row_log_ratio = _row_prepass(logp_ptr, old_ptr, rollout_ptr, mask_ptr, row,
                                                n_steps, is_low, is_high, HAS_MASK, IS_MODE, IS_SEQ,
                                                SEQ_RATIO, BLOCK_SIZE)
    row_w = _clamped_exp(row_log_w)
    acc_loss = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc_kept = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc_clipped = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc_dual = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc_ratio = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    max_ratio = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc_valid = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    max_w = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(first, tl.minimum(first + chunk, n_steps), BLOCK_SIZE):
        offs, in_range, valid = _block(mask_ptr, row, start, n_steps, HAS_MASK, BLOCK_SIZE)
        logp = _load_f32(logp_ptr, offs, in_range, valid)
        old_logp = _load_f32(old_ptr, offs, in_range, valid)
        adv = _load_f32(adv_ptr, offs, in_range, valid)
        kept = valid
        if IS_MODE != 0:
            if IS_SEQ:
                w = tl.where(valid, row_w, 0.0)
            else:
                log_w = _token_weight(old_logp, _load_f32(rollout_ptr, offs, in_range, valid),
                                      valid)
                w = tl.where(valid, _clamped_exp(log_w), 0.0)
            acc_w += w
            max_w = tl.maximum(max_w, w)
            if IS_MODE == 1:
                adv = adv * tl.minimum(w, is_cap)
            else:
                kept = valid & (w >= is_low) & (w <= is_high)
        raw_log_ratio = logp - old_logp
        if SEQ_RATIO:
            raw_log_ratio = tl.where(kept, row_log_ratio, 0.0)
        log_ratio = tl.minimum(tl.maximum(raw_log_ratio, -log_ratio_clamp), log_ratio_clamp)
        ratio = tl.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
        is_clipped = clipped > unclipped
        loss = tl.maximum(unclipped, clipped)
        # Where the clipped branch wins, clip() is flat (the ratio is outside the range), and where
        # the log-ratio is clamped the ratio is constant: gradient 0 in both.
        grad = tl.where(is_clipped | (raw_log_ratio != log_ratio), 0.0, unclipped)
        is_dual = tl.zeros([BLOCK_SIZE], dtype=tl.int1)
        if HAS_DUAL:
            bound = -adv * dual_clip
            is_dual = (adv < 0) & (bound < loss)
            loss = tl.where(is_dual, bound, loss)
            grad = tl.where(is_dual, 0.0, grad)
        if STORE_GRAD:
            tl.store(dterm_ptr + offs, tl.where(kept, grad, 0.0), mask=in_range)
        acc_loss += tl.where(kept, loss, 0.0)
        acc_kept += kept.to(tl.float32)
        acc_clipped += (is_clipped & kept).to(tl.float32)
        acc_dual += (is_dual & kept).to(tl.float32)
        acc_kl += tl.where(kept, ratio - 1.0 - log_ratio, 0.0)   # k3 estimate of KL(old || new)
        acc_ratio += tl.where(kept, ratio, 0.0)
        max_ratio = tl.maximum(max_ratio, tl.where(kept, ratio, 0.0))
        acc_valid += valid.to(tl.float32)
    _store_partials(partials_ptr, acc_loss, acc_kept, acc_clipped, acc_dual, acc_kl, acc_ratio,
                    max_ratio, acc_valid, acc_w, max_w)


@triton.jit
def _value_rows_kernel(
    values_ptr,       # [rows, T] float
    old_ptr,          # [rows, T] float
    returns_ptr,      # [rows, T] float
    mask_ptr,         # [rows, T] uint8/int (read only if HAS_MASK)
    dterm_ptr,        # [rows, T] fp32 out: d term / d values (only if STORE_GRAD)
    partials_ptr,     # [rows, chunks, N_PARTIALS] fp32 out
    n_steps,
    chunk,
    clip_eps,         # values are clipped to old_values +- clip_eps (used only if HAS_CLIP)
    HAS_MASK: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * n_steps
    first = tl.program_id(1) * chunk
    acc_loss = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc_valid = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc_clipped = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(first, tl.minimum(first + chunk, n_steps), BLOCK_SIZE):
        offs, in_range, valid = _block(mask_ptr, row, start, n_steps, HAS_MASK, BLOCK_SIZE)
        values = _load_f32(values_ptr, offs, in_range, valid)
        returns = _load_f32(returns_ptr, offs, in_range, valid)
        error = values - returns
        loss = 0.5 * error * error
        grad = error
        if HAS_CLIP:
            old_values = _load_f32(old_ptr, offs, in_range, valid)
            clipped_error = tl.minimum(tl.maximum(values, old_values - clip_eps),
                                       old_values + clip_eps) - returns
            clipped_loss = 0.5 * clipped_error * clipped_error
            # The clipped term can only win when the value is outside the clip range, where it is
            # flat in the value: gradient 0.
            is_clipped = clipped_loss > loss
            loss = tl.where(is_clipped, clipped_loss, loss)
            grad = tl.where(is_clipped, 0.0, grad)
            acc_clipped += (is_clipped & valid).to(tl.float32)
        if STORE_GRAD:
            tl.store(dterm_ptr + offs, tl.where(valid, grad, 0.0), mask=in_range)
        acc_loss += tl.where(valid, loss, 0.0)
        acc_valid += valid.to(tl.float32)
    zero = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    _store_partials(partials_ptr, acc_loss, acc_valid, acc_clipped, zero, zero, zero, zero,
                    acc_valid, zero, zero)


@triton.jit
def _pick(vec, i, N: tl.constexpr):
    """vec[i] of an [N] vector, as a scalar."""
    return tl.sum(tl.where(tl.arange(0, N) == i, vec, 0.0), axis=0)


@triton.jit
def _load_partials(partials_ptr, rows, here, n_chunks, c):
    """[ROW_BLOCK, 16] partials of chunk c of `rows` (columns past N_PARTIALS and rows past the
    end read as 0, the identity of every column's sum and max)."""
    cols = tl.arange(0, 16)
    base = (rows.to(tl.int64) * n_chunks + c) * 10
    return tl.load(partials_ptr + base[:, None] + cols[None, :],
                   mask=here[:, None] & (cols < 10)[None, :], other=0.0)


@triton.jit
def _finalize_kernel(
    partials_ptr,     # [rows, chunks, N_PARTIALS] fp32
    loss_ptr,         # [] fp32 out
    stats_ptr,        # [len(STATS)] fp32 out
    weights_ptr,      # [rows] fp32 out: the aggregation weight of each row's kept tokens
    n_rows,
    n_chunks,
    norm,             # seq-mean-token-sum-norm's constant
    AGG: tl.constexpr,        # index in statistics.AGGS (the aggregation rules there)
    ROW_BLOCK: tl.constexpr,
):
    cols = tl.arange(0, 16)
    sums = tl.zeros([ROW_BLOCK, 16], dtype=tl.float32)
    maxes = tl.zeros([ROW_BLOCK, 16], dtype=tl.float32)
    n_seqs = tl.zeros([ROW_BLOCK], dtype=tl.float32)
    for first in range(0, n_rows, ROW_BLOCK):
        rows = first + tl.arange(0, ROW_BLOCK)
        here = rows < n_rows
        row_sums = tl.zeros([ROW_BLOCK, 16], dtype=tl.float32)
        for c in range(0, n_chunks):
            block = _load_partials(partials_ptr, rows, here, n_chunks, c)
            row_sums += block
            maxes = tl.maximum(maxes, block)
        sums += row_sums
        n_seqs += (tl.sum(tl.where(cols[None, :] == 1, row_sums, 0.0), axis=1) > 0).to(tl.float32)
    totals = tl.sum(sums, axis=0)                                          # [16]
    top = tl.max(maxes, axis=0)                                            # [16]
    n_tokens = _pick(totals, 1, 16)
    n_seqs_total = tl.maximum(tl.sum(n_seqs, axis=0), 1.0)
    # Second pass: each row's weight, and the loss as the weighted sum of the rows' loss sums.
    loss = tl.zeros([ROW_BLOCK], dtype=tl.float32)
    for first in range(0, n_rows, ROW_BLOCK):
        rows = first + tl.arange(0, ROW_BLOCK)
        here = rows < n_rows
        row_loss = tl.zeros([ROW_BLOCK], dtype=tl.float32)
        kept = tl.zeros([ROW_BLOCK], dtype=tl.float32)
        for c in range(0, n_chunks):
            base = (rows.to(tl.int64) * n_chunks + c) * 10
            row_loss += tl.load(partials_ptr + base, mask=here, other=0.0)
            kept += tl.load(partials_ptr + base + 1, mask=here, other=0.0)
        w = tl.zeros([ROW_BLOCK], dtype=tl.float32)
        if AGG == 0:      # token-mean
            w += 1.0 / tl.maximum(n_tokens, 1.0)
        elif AGG == 1:    # seq-mean-token-mean
            w += 1.0 / (tl.maximum(kept, 1.0) * n_seqs_total)
        elif AGG == 2:    # seq-mean-token-sum
            w += 1.0 / n_seqs_total
        elif AGG == 3:    # token-sum
            w += 1.0
        else:             # seq-mean-token-sum-norm
            w += 1.0 / norm
        tl.store(weights_ptr + rows, w, mask=here)
        loss += row_loss * w
    tl.store(loss_ptr, tl.sum(loss, axis=0))
    # Means over the kept tokens (clip fractions, k3, ratio), over the valid ones (IS weights).
    count = tl.maximum(n_tokens, 1.0)
    n_valid = _pick(totals, 7, 16)
    valid_count = tl.maximum(n_valid, 1.0)
    tl.store(stats_ptr + 0, _pick(totals, 2, 16) / count)
    tl.store(stats_ptr + 1, _pick(totals, 3, 16) / count)
    tl.store(stats_ptr + 2, _pick(totals, 4, 16) / count)
    tl.store(stats_ptr + 3, _pick(totals, 5, 16) / count)
    tl.store(stats_ptr + 4, _pick(top, 6, 16))
    tl.store(stats_ptr + 5, _pick(totals, 8, 16) / valid_count)
    tl.store(stats_ptr + 6, _pick(top, 9, 16))
    tl.store(stats_ptr + 7, (n_valid - n_tokens) / valid_count)


@triton.jit
def _scaled_grad_kernel(
    grad_loss_ptr,    # [] upstream gradient of the loss (any float)
    dterm_ptr,        # [n] fp32 d term / d x
    weights_ptr,      # [rows] fp32
    grad_ptr,         # [n] out, x's dtype
    n_elements,
    n_steps,
    BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_range = offs < n_elements
    scale = tl.load(grad_loss_ptr).to(tl.float32)
    dterm = tl.load(dterm_ptr + offs, mask=in_range, other=0.0)
    w = tl.load(weights_ptr + offs // n_steps, mask=in_range, other=0.0)
    tl.store(grad_ptr + offs, (scale * w * dterm).to(grad_ptr.dtype.element_ty), mask=in_range)
