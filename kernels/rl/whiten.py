"""masked_whiten, the op: masked whitening (advantage normalization) in two Triton launches, the
valid entries' moments, then the normalized output; the torch composition is
statistics.masked_whiten.

  _moments_kernel  P programs, each walking every P-th block of the flat input: the count, mean
                   and sum of squared deviations (M2) of its valid entries, blocks joined by Chan's
                   parallel formula (exact per block, no sum-of-squares cancellation).
  _whiten_kernel   the same P programs: each joins the P partials (a few KiB, from L2) into the
                   global mean and unbiased variance, then writes its blocks.

The grid-wide reduction is why there are two launches; no host sync (P is fixed by the size).
Statistics over ranks (sum_over) join the ranks' partials between the two launches.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks
from . import statistics
from ..dispatch import backend_for
from ..triton_compat import tl, triton
from ..direct_ops import direct_op

OP = "masked_whiten"
# entries per block: 16 fp32 per thread at 4 warps (128-bit loads of the mask too)
BLOCK = 2048
MAX_PROGRAMS = 1024   # partials each program of the second pass joins


@triton.jit
def _join(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s combination of two (count, mean, M2) summaries."""
    n = n_a + n_b
    delta = mean_b - mean_a
    share = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    return n, mean_a + delta * share, m2_a + m2_b + delta * delta * n_a * share


@triton.jit
def _load_block(x_ptr, mask_ptr, block, n_elements, BLOCK_SIZE: tl.constexpr):
    # int64 offsets (block is an int32 loop counter compiled, a Python int interpreted)
    offs = (tl.zeros([], tl.int64) + block) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_range = offs < n_elements
    valid = in_range & (tl.load(mask_ptr + offs, mask=in_range, other=0) != 0)
    x = tl.where(valid, tl.load(x_ptr + offs, mask=in_range, other=0.0).to(tl.float32), 0.0)
    return offs, in_range, valid, x


@triton.jit
def _moments_kernel(
    x_ptr,            # [n] float
    mask_ptr,         # [n] uint8/int, nonzero = valid
    partials_ptr,     # [3, P] fp32 out: count, mean, M2 of each program's valid entries
    n_elements,
    BLOCK_SIZE: tl.constexpr,
):
    pid, n_programs = tl.program_id(0), tl.num_programs(0)
    n, mean, m2 = tl.zeros([], tl.float32), tl.zeros([], tl.float32), tl.zeros([], tl.float32)
    for block in range(pid, tl.cdiv(n_elements, BLOCK_SIZE), n_programs):
        _, _, valid, x = _load_block(x_ptr, mask_ptr, block, n_elements, BLOCK_SIZE)
        n_b = tl.sum(valid.to(tl.float32), axis=0)
        mean_b = tl.sum(x, axis=0) / tl.maximum(n_b, 1.0)
        centered = tl.where(valid, x - mean_b, 0.0)
        n, mean, m2 = _join(n, mean, m2, n_b, mean_b, tl.sum(centered * centered, axis=0))
    tl.store(partials_ptr + pid, n)
    tl.store(partials_ptr + n_programs + pid, mean)
    tl.store(partials_ptr + 2 * n_programs + pid, m2)


@triton.jit
def _whiten_kernel(
    x_ptr,            # [n] float
    mask_ptr,         # [n] uint8/int
    partials_ptr,     # [3, P] fp32 from _moments_kernel
    out_ptr,          # [n] fp32 out
    n_elements,
    eps,              # added to the unbiased variance
    SHIFT_MEAN: tl.constexpr,   # False: the mean is added back (scale only)
    P_POW2: tl.constexpr,       # next power of two >= P
    BLOCK_SIZE: tl.constexpr,
):
    pid, n_programs = tl.program_id(0), tl.num_programs(0)
    i = tl.arange(0, P_POW2)
    here = i < n_programs
    n_i = tl.load(partials_ptr + i, mask=here, other=0.0)
    mean_i = tl.load(partials_ptr + n_programs + i, mask=here, other=0.0)
    m2_i = tl.load(partials_ptr + 2 * n_programs + i, mask=here, other=0.0)
    n = tl.sum(n_i, axis=0)
    mean = tl.sum(n_i * mean_i, axis=0) / tl.maximum(n, 1.0)
    m2 = tl.sum(m2_i + n_i * (mean_i - mean) * (mean_i - mean), axis=0)
    scale = 1.0 / tl.sqrt(m2 / tl.maximum(n - 1.0, 1.0) + eps)
    for block in range(pid, tl.cdiv(n_elements, BLOCK_SIZE), n_programs):
        offs, in_range, valid, x = _load_block(x_ptr, mask_ptr, block, n_elements, BLOCK_SIZE)
        white = (x - mean) * scale
        if not SHIFT_MEAN:
            white += mean
        tl.store(out_ptr + offs, tl.where(valid, white, 0.0), mask=in_range)


def _join_ranks(partials: torch.Tensor, sum_fn: statistics.SumFn) -> torch.Tensor:
    """This rank's programs' (count, mean, M2) partials [3, P] -> [3, P] holding every rank's
    (count, mean, M2) in the first column and empty partials (count 0) after it, which
    _whiten_kernel joins as it joins any. Two calls of sum_fn, in float64: the counts and sums, then
    the squares about the ranks' mean (Chan's formula, as the kernels join their blocks)."""
    n_i, mean_i, m2_i = partials.double()
    count, total = sum_fn(torch.stack([n_i.sum(), (n_i * mean_i).sum()]))
    mean = total / count.clamp_min(1)
    m2 = sum_fn((m2_i + n_i * (mean_i - mean) ** 2).sum().reshape(1))[0]
    joined = torch.zeros_like(partials)
    joined[:, 0] = torch.stack([count, mean, m2]).float()
    return joined


def _whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, eps: float,
            sum_fn: Optional[statistics.SumFn] = None) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    n = x.numel()
    if not n and sum_fn is None:
        return out
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    n_programs = max(min(triton.cdiv(n, BLOCK), MAX_PROGRAMS), 1)
    if n:
        partials = torch.empty(3, n_programs, dtype=torch.float32, device=x.device)
        _moments_kernel[(n_programs,)](x, mask, partials, n, BLOCK_SIZE=BLOCK)
    else:  # a rank with no entries still joins the others' sums
        partials = torch.zeros(3, n_programs, dtype=torch.float32, device=x.device)
    if sum_fn is not None:
        partials = _join_ranks(partials, sum_fn)
    if n:
        _whiten_kernel[(n_programs,)](x, mask, partials, out, n, eps, SHIFT_MEAN=shift_mean,
                                      P_POW2=triton.next_power_of_2(n_programs), BLOCK_SIZE=BLOCK)
    return out


@direct_op("fusedrl::masked_whiten", mutates_args=())
def _whiten_op(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, eps: float) -> torch.Tensor:
    """The Triton kernels for torch.compile (no gradient: see masked_whiten)."""
    return _whiten(x, mask, shift_mean, eps)


@_whiten_op.register_fake
def _whiten_fake(x, mask, shift_mean, eps):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                  eps: float = 1e-8, sum_over: statistics.SumOver = None) -> torch.Tensor:
    """Normalize x to mean 0, variance 1 over the valid entries (advantage whitening).

    Args:
        x: [...] float. mask: [...] bool/integer/float, nonzero = valid.
        shift_mean: if False, the mean is added back (scale only).
        eps: added to the (unbiased) variance.
        sum_over: the ranks' sum (see statistics.py): the mean and variance of every rank's valid
            entries (every rank must call); None (or a group of one rank): this process's.
    Returns:
        [...] fp32, 0 outside the mask. On the fused backends two launches (cuda runs the Triton
        kernels), no host sync; with sum_over, the ranks' partials are joined between them. Where x
        requires grad the differentiable composition statistics.masked_whiten runs instead (the
        same numbers to fp32 rounding).
    """
    checks.check_float(OP, "x", x)
    mask = checks.mask_arg(OP, mask, "x", x, optional=False)
    checks.check_positive(OP, "eps", eps)
    sum_fn = statistics.summing(sum_over)
    compiling = torch.compiler.is_compiling()
    if (backend_for(x) == "torch" or (x.requires_grad and torch.is_grad_enabled())
            or (sum_fn is not None and compiling)):           # the custom op takes no function
        # fp32 as the fused kernels give it, whatever x's dtype (the composition keeps fp64's)
        return statistics.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps,
                                        sum_over=sum_fn).to(torch.float32)
    args = (x.detach().contiguous(), mask.contiguous(), bool(shift_mean), float(eps))
    return _whiten_op(*args) if compiling else _whiten(*args, sum_fn)
