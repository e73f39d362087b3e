"""The one online log-softmax core: Triton helpers that reduce a row of (scaled) logits to its max
m, sum of exp(z - m) s and, for the entropy, t = sum exp(z - m) * (z - m).

A row is reduced in lanes: each lane of a [BLOCK] state keeps its own running (m, s, t) over the
logits it sees (`lanes_update`, one exp per logit and no cross-thread reduction), and the lanes are
combined once at the end (`lanes_reduce`). Block-wise reductions instead (a max and a sum over the
block, then a rescale) put two block-wide reductions, each a barrier, between one block's loads and
the next; on an H100 that held a one-program-per-row forward at 0.83 of the read rate.

A GEMM that makes its logits a tile at a time (the LM head, rl/linear_logprobs_kernels.py) folds
each [rows, columns] tile into per-row states instead (`rows_fold`): its tile is already spread over
the warps, and the per-row state is all it keeps between tiles.

Users: `fusedrl.kernels.rl.logprobs` (token log-probs and entropy, forward), the batch-invariant
mode's `row_logprobs` (engine/model/invariant) and the sampler's chunk statistics and their merge
(kernels/sampling), the LM head's fused forward. One program per row and a fixed reduction order: a
row's result depends on its own logits and the block size only, never on the batch (the exact mode
relies on it).
"""
from __future__ import annotations

from .triton_compat import tl, triton


@triton.jit
def safe_shift(m):
    """The shift for exp(z - m): 0 where m is -inf (every logit so far -inf), so exp sees no inf -
    inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def lanes_of(z):
    """The lane state of one block of scaled logits z [BLOCK]: each lane holds one logit."""
    return z, tl.where(z == float("-inf"), 0.0, 1.0), tl.zeros_like(z)


@triton.jit
def lanes_update(m, s, t, z, HAS_ENTROPY: tl.constexpr):
    """Fold one block of scaled logits z [BLOCK] into the lane state (m, s, t) [BLOCK], elementwise.

    One exp per logit: with lo = min(m, z) and hi = max(m, z), e = exp(lo - hi) is both the old
    sum's rescale when z is the new max and z's own term when it is not."""
    grow = z > m
    # A NaN logit makes its lane NaN for good (and so the row's result), as a sum would.
    hi = tl.maximum(m, z, propagate_nan=tl.PropagateNan.ALL)
    e = tl.exp(tl.minimum(m, z, propagate_nan=tl.PropagateNan.ALL) - safe_shift(hi))
    if HAS_ENTROPY:
        # t is centred on the lane's max. A new max re-centres the old terms by (m - z) each (no
        # term while s is 0: m is -inf); an old max adds z's term, 0 for a -inf logit (its limit).
        t = tl.where(grow, e * (t + tl.where(s > 0, (m - z) * s, 0.0)),
                     t + tl.where(e > 0, e * (z - m), 0.0))
    s = tl.where(grow, s * e + 1.0, s + e)
    return hi, s, t


@triton.jit
def lanes_reduce(m, s, t, HAS_ENTROPY: tl.constexpr):
    """Combine lane states [BLOCK] (or any partial states, e.g. one per chunk of a row) into the
    row's scalars (m, s, t), all centred on m. Then logsumexp = safe_shift(m) + log(s) and the
    entropy = log(s) - t / s."""
    row_max = tl.max(m, axis=0)
    shift = safe_shift(row_max)
    weight = tl.exp(m - shift)  # 0 for an empty lane (m = -inf)
    total = tl.sum(s * weight, axis=0)
    t_total = 0.0
    if HAS_ENTROPY:
        t_total = tl.sum(weight * (t + tl.where(s > 0, (m - shift) * s, 0.0)), axis=0)
    return row_max, total, t_total


@triton.jit
def rows_fold(m, s, t, z, HAS_ENTROPY: tl.constexpr):
    """Fold a tile of scaled logits z [ROWS, COLS] into per-row states (m, s, t) [ROWS], t centred
    on m as everywhere here: the old sums are rescaled by exp(m - m') onto the new max m' (and t
    re-centred by (m - m') s), the tile adds its terms. States start at (-inf, 0, 0)."""
    hi = tl.maximum(m, tl.max(z, axis=1))
    shift = safe_shift(hi)
    e = tl.exp(z - shift[:, None])  # 0 for a -inf logit; NaN for a NaN one, which then stays
    rescale = tl.exp(m - shift)     # 0 while the state is empty (m = -inf)
    if HAS_ENTROPY:
        t = rescale * (t + tl.where(s > 0, (m - shift) * s, 0.0)) + \
            tl.sum(tl.where(e > 0, e * (z - shift[:, None]), 0.0), axis=1)
    s = rescale * s + tl.sum(e, axis=1)
    return hi, s, t
