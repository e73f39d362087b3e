"""The split-row sampler: each row's vocabulary is cut into CHUNK-sized pieces, one Triton program
each, and merged; no sort, no per-row histogram of the whole key range, and (but in the fallback)
no serial search: the logits read twice. This file holds the host side (buffers, launches, the
custom op fusedrl::sample) and the public `sample`; the kernels are in chunk_stats.py
(launches 1-2) and window_draw.py (launches 3-4), their shared device functions in
keys_and_noise.py.

Same semantics as the torch reference `fusedrl.kernels.reference.sample` (its oracle and the "torch"
backend; the rules are in reference/sampling.py: cuts at 16-bit order-key granularity, ties kept).
Four launches, whatever the batch (a row's chunks run in parallel, so one row alone spreads over
vocab / CHUNK programs):

1. `_chunk_stats_kernel` [rows, chunks] reads the logits once: each chunk's max, sum of exp, first
   argmax, and (rows that draw without a cut) its best Gumbel score. Rows with top-k or top-p also
   count the chunk's tokens per profile cell, a 1/CELLS_PER_UNIT-wide step of the key-valued scaled
   logit below the chunk's own top cell (cells on one lattice, so the chunks' profiles align);
2. `_merge_kernel` [rows] merges the chunks (max, sum, greedy token, plain draw: those rows are
   done) and, for rows with a cut, adds the profiles into the row's: exact counts and, per cell,
   bounds of the mass, hence a bracket of keys that must hold the cut (everything above it surely
   kept, everything below surely cut). A bracket wider than WINDOW keys, or deeper than the
   profile, sends the row to the fallback;
3. `_window_kernel` [rows, chunks] reads the logits of the rows with a cut (or min-p) again: per
   chunk the count and mass of the tokens above the bracket and their best Gumbel score; the
   tokens inside it are counted per key into the row's WINDOW-key window (atomics for these few
   only), which also keeps per key the best packed (Gumbel score, index) of the tokens that can
   still win (score >= the row's most likely token's) and, for fp32 logits, their exact mass;
4. `_finish_kernel` [rows] walks the window from its top key to the exact cut (top-k counts, then
   top-p mass within the top-k set), checks that the bracket held it, draws the best kept token and
   its log-prob, and empties the window bins it used. The fallback (a row whose bracket did not
   fit, or missed) walks the row's keys WINDOW at a time, counting each slice in one program's
   registers, then draws in one more pass: correct for any row, slower, a read per slice.

The window is a `SamplerWorkspace` the caller owns and passes in (the engine's model runner keeps
one for its largest batch, created once, so a captured CUDA graph keeps valid pointers): never
cleared by a separate op, emptied by the kernel that read it. Without one, a call makes a fresh
empty window (three fill ops more). No state lives in this module.

A row with a cut reads its logits about twice (once per pass, plus the merge's profiles and the
window's atomics), a plain draw once; a row that falls back reads them once more per WINDOW-key
slice walked (bench/results/README.md has the counted bytes).
"""
from __future__ import annotations

import torch

from .. import checks, reference
from ..dispatch import fused_for_model, sync_checks_enabled
from .chunk_stats import _chunk_stats_kernel, _merge_kernel
from .window_draw import _finish_kernel, _window_kernel
from ..triton_compat import triton
from ..direct_ops import direct_op

# tokens per program; fixed (not chosen by batch), so a row's numbers never depend on it
CHUNK = 4096
# profile cells per unit of scaled logit: a cell's mass is known within e^(1/16)
CELLS_PER_UNIT = 16
# cells per chunk (the last: everything deeper): 32 units, past any top-p cut of V < 4e6
PROFILE = 512
# keys of a row's window: per key its count, best packed score and (fp32) fixed-point mass
WINDOW = 2048
_FIXED = 2.0 ** 40  # fp32 window masses exp(s - max) <= 1 as int64 sums: exact, in any order
_EMPTY = -(2 ** 63)  # an empty best-score bin (below every packed score)
# rounds of a chunk's best-of-the-keys-above before its window candidates all go atomic
_RECORDS = 3
# relative slack of the merge's mass bounds against rounding (a miss costs time, not truth)
_SLACK = 1e-4


class SamplerWorkspace:
    """The sampler's per-row key windows for up to `rows` rows, created empty: counts [rows, WINDOW]
    int32, best packed (score, index) [rows, WINDOW] int64, fixed-point mass [rows, WINDOW] int64
    (fp32 logits). Each call leaves the bins it used empty again, so one workspace serves every call
    made in order on one stream (not two calls at once)."""

    def __init__(self, rows: int, device):
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"SamplerWorkspace: rows={rows!r} must be an int >= 1")
        self.counts = torch.zeros(rows, WINDOW, dtype=torch.int32, device=device)
        self.best = torch.full((rows, WINDOW), _EMPTY, dtype=torch.int64, device=device)
        self.mass = torch.zeros(rows, WINDOW, dtype=torch.int64, device=device)

    @property
    def rows(self) -> int:
        return self.counts.shape[0]

    def is_empty(self) -> bool:
        """Every bin empty (a check for tests: it reads the whole window)."""
        return bool((self.counts == 0).all() and (self.best == _EMPTY).all()
                    and (self.mass == 0).all())


def sample_triton(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps,
                  workspace: SamplerWorkspace | None = None):
    """The split-row sampler; arguments and results as `sample` (logits [B, V] fp32 or
    bf16/fp16, read in their own dtype and computed in fp32). Returns (tokens [B] int64, logprobs
    [B] fp32). workspace: the key windows (>= B rows, on the logits' device), else a fresh one. A
    torch custom op (fusedrl::sample): one node to torch.compile, one op to a TorchDispatchMode."""
    min_ps = _check_args("sample_triton", logits, temperatures, top_ks, top_ps, seeds, positions,
                         min_ps)
    return _sample_triton(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps, workspace)


def _sample_triton(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps, workspace):
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    if workspace is None:
        workspace = SamplerWorkspace(max(1, logits.shape[0]), logits.device)
    elif workspace.rows < logits.shape[0] or workspace.counts.device != logits.device:
        raise ValueError(
            f"sample_triton: workspace of {workspace.rows} rows on {workspace.counts.device} "
            f"for {logits.shape[0]} rows of logits on {logits.device}")
    return _sample_op(logits, temperatures.float().contiguous(), top_ks.contiguous(),
                      top_ps.float().contiguous(), seeds.contiguous(), positions.contiguous(),
                      min_ps.float().contiguous(), workspace.counts, workspace.best,
                      workspace.mass)


# The windows are mutated (and left empty again): declared, so that torch.compile orders calls on
# them.
@direct_op("fusedrl::sample", mutates_args=("window_counts", "window_best", "window_mass"))
def _sample_op(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor,
               top_ps: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
               min_ps: torch.Tensor, window_counts: torch.Tensor, window_best: torch.Tensor,
               window_mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, vocab = logits.shape
    tokens, logprobs = _sample_fake(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps,
                                    window_counts, window_best, window_mass)
    if batch == 0:
        return tokens, logprobs
    block = min(CHUNK, triton.next_power_of_2(vocab))  # a function of the vocabulary only
    chunks = triton.cdiv(vocab, block)
    padded = triton.next_power_of_2(chunks)
    params = (temperatures, top_ks, top_ps, min_ps)
    device = logits.device
    stats = torch.empty(batch, chunks, 4, dtype=torch.float32, device=device)
    args = torch.empty(batch, chunks, 5, dtype=torch.int32, device=device)
    profile = torch.empty(batch, chunks, PROFILE, dtype=torch.int16, device=device)
    rows = torch.empty(batch, 3, dtype=torch.float32, device=device)
    windows = torch.empty(batch, 4, dtype=torch.int32, device=device)
    part = torch.empty(batch, chunks, 3, dtype=torch.float32, device=device)
    part_args = torch.empty(batch, chunks, 2, dtype=torch.int32, device=device)
    window = (window_counts, window_best, window_mass)
    # No FMA contraction: a fused x * inv_temp - m skips the product's rounding, so the max token's
    # scaled logit minus the max is not 0 (at temperature 1e-8, off by ~1e5: a kept mass of 0 and
    # a log-prob of inf), and the Gumbel scores round otherwise than the reference's separate ops.
    dtypes = dict(IS_FP32=logits.dtype == torch.float32, IS_FP16=logits.dtype == torch.float16,
                  enable_fp_fusion=False)
    _chunk_stats_kernel[(batch, chunks)](logits, *params, seeds, positions, stats, args, profile,
                                         vocab, logits.stride(0), CHUNK=block, PROFILE=PROFILE,
                                         CELLS_PER_UNIT=CELLS_PER_UNIT, **dtypes)
    _merge_kernel[(batch,)](stats, args, profile, seeds, positions, *params, rows, windows, tokens,
                            logprobs, vocab, chunks, CHUNKS=padded, PROFILE=PROFILE,
                            CELLS_PER_UNIT=CELLS_PER_UNIT, WINDOW=WINDOW, SLACK=_SLACK, **dtypes)
    _window_kernel[(batch, chunks)](logits, *params, seeds, positions, rows, windows, part,
                                    part_args, *window, vocab, logits.stride(0), CHUNK=block,
                                    WINDOW=WINDOW, FIXED=_FIXED, EMPTY=_EMPTY, RECORDS=_RECORDS,
                                    **dtypes)
    _finish_kernel[(batch,)](logits, *params, seeds, positions, rows, windows, part, part_args,
                             *window, tokens, logprobs, vocab, logits.stride(0), chunks,
                             CHUNKS=padded, CHUNK=block, WINDOW=WINDOW, FIXED=_FIXED, EMPTY=_EMPTY,
                             **dtypes)
    return tokens, logprobs


@_sample_op.register_fake
def _sample_fake(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps, window_counts,
                 window_best, window_mass):
    batch = logits.shape[0]
    return (torch.empty(batch, dtype=torch.int64, device=logits.device),
            torch.empty(batch, dtype=torch.float32, device=logits.device))


def sample(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps=None,
           workspace: SamplerWorkspace | None = None):
    """Draw one token per row: the split-row Triton sampler where the model's kernels run
    (dispatch.fused_for_model: no host sync, no sort, bf16/fp16 logits read as they are), else the
    torch reference (`reference.sample`, the same draws).

    logits [B, V] fp32/bf16/fp16 (computed in fp32); temperatures [B] fp32 (0 = greedy); top_ks [B]
    int64 (0 = off); top_ps [B] fp32 (1 = off); seeds [B] int64; positions [B] int64 (index of the
    token being drawn); min_ps [B] fp32 (0 = off, the default); workspace: the Triton sampler's key
    windows (kept by the caller across steps), else a fresh one per call.
    Returns (tokens [B] int64, logprobs [B] fp32): the log-prob of each token under the distribution
    it was drawn from (temperature-scaled, filtered, renormalized; greedy rows: the model's).
    """
    min_ps = _check_args("sample", logits, temperatures, top_ks, top_ps, seeds, positions, min_ps)
    if fused_for_model(logits):
        return _sample_triton(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps,
                              workspace)
    return reference.sample(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps)


def _check_args(op, logits, temperatures, top_ks, top_ps, seeds, positions, min_ps):
    """`sample`'s arguments as its docstring has them -> min_ps (zeros for None). Shapes, dtypes
    and devices always (the kernels index every per-row tensor by row: a short one is read out of
    bounds); the values where dispatch.sync_checks_enabled (a negative temperature would reverse
    the distribution, a NaN one or a top_p above 1 filter silently)."""
    checks.check_dtype(op, "logits", logits, (torch.float32, torch.bfloat16, torch.float16))
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"{op}: logits must have shape [B, V] with V >= 1, got "
                         f"{tuple(logits.shape)}")
    if min_ps is None:
        min_ps = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    rows = (logits.shape[0],)
    per_row = (("temperatures", temperatures, torch.float32), ("top_ks", top_ks, torch.int64),
               ("top_ps", top_ps, torch.float32), ("seeds", seeds, torch.int64),
               ("positions", positions, torch.int64), ("min_ps", min_ps, torch.float32))
    for name, t, dtype in per_row:
        checks.check_dtype(op, name, t, (dtype,))
        if t.shape != rows:
            raise ValueError(f"{op}: {name} must have shape {rows} (one per row of logits), got "
                             f"{tuple(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"{op}: {name} is on {t.device} but logits are on {logits.device}")
    if sync_checks_enabled(logits):
        checks.check_values(op, "temperatures", temperatures,
                            torch.isfinite(temperatures) & (temperatures >= 0),
                            "finite and >= 0 (0 = greedy)")
        checks.check_values(op, "top_ks", top_ks, top_ks >= 0, ">= 0 (0 = off)")
        checks.check_values(op, "top_ps", top_ps, (top_ps >= 0) & (top_ps <= 1),
                            "in [0, 1] (1 = off, 0 = the most likely token only)")
        checks.check_values(op, "min_ps", min_ps, (min_ps >= 0) & (min_ps <= 1),
                            "in [0, 1] (0 = off)")
    return min_ps
