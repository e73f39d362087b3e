"""The tile product the GEMM kernels share: on the tensor cores, or summed on the CUDA cores for
tiles of fewer rows than an mma takes, with the interpreter's stand-in.

Users: model/norm_linear.py (decode's norm + projection), rl/linear_logprobs_kernels.py
(the LM head with the log-softmax in the GEMM's epilogue) and attention/paged.py (decode's
scores and weighted values over a tile of cached positions).
"""
from __future__ import annotations

from .triton_compat import tl, triton


@triton.jit
def _summed_nt(a, w, acc):
    """acc + a [M, K] @ w [N, K].T as fp32 products summed over K (no tensor cores)."""
    return acc + tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def dot_nt(a, w, acc, INTERPRETED: tl.constexpr):
    """acc + a [M, K] @ w [N, K].T in fp32. 16-bit inputs take the tensor cores; fp32 inputs are
    multiplied in full fp32 ("ieee", as torch's matmul does by default), not TF32, and so are fp64
    inputs, rounded to fp32 first (an fp64 tl.dot would return fp64, not the fp32 accumulator; the
    interpreter's branch rounds them the same way). The interpreter's tl.dot is numpy's matmul,
    which mishandles 16-bit floats: there, fp32 products summed over the K tile stand in for the
    mma. A tile of fewer than 16 rows (a decode step's GEMV: tl.dot takes 16 at least) is the same
    sum of fp32 products on the CUDA cores, each weight loaded once and used by every row."""
    if INTERPRETED:
        return _summed_nt(a, w, acc)
    if a.shape[0] < 16:  # a test of its own, as below
        return _summed_nt(a, w, acc)
    if a.dtype == tl.float64:  # a test of its own: `or` of two dtype tests is not folded
        a, w = a.to(tl.float32), w.to(tl.float32)
    if a.dtype == tl.float32:
        return tl.dot(a, tl.trans(w), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(w), acc)
