"""The batch-invariant mode's log-softmax on GPUs: log p(token) and the entropy of softmax(logits /
T), one Triton program per row, for the sampler and for the trainer alike.

A row is read in blocks of BLOCK_V logits from its first column to its last, each block folded into
per-lane running (max, sum-exp, entropy sum) states and the lanes combined once at the end, by the
shared core `fusedrl.kernels.online_softmax` (as `fusedrl.kernels.rl.logprobs` does); the block size
and warps depend on the vocabulary only, and the entropy is always accumulated (the trainer asks for
it, the sampler does not: one code path keeps the two log-probs one computation). The temperature is
read per row and divides each logit, as the CPU path (`ops.token_logprobs`) does.
"""
from __future__ import annotations

import torch

from ..online_softmax import lanes_reduce, lanes_update, safe_shift
from ..triton_compat import tl, triton
from ..direct_ops import direct_op


@triton.jit
def _row_logprobs_kernel(
    logits_ptr,  # [R, V] fp32, unit column stride
    tokens_ptr,  # [R] int64
    temperatures_ptr,  # [R] fp32 (> 0)
    logp_ptr,  # [R] fp32 out
    entropy_ptr,  # [R] fp32 out
    n_cols,  # V
    row_stride,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    temperature = tl.load(temperatures_ptr + row)
    base = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    t = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        z = tl.load(base + start + cols, mask=start + cols < n_cols, other=float("-inf"))
        m, s, t = lanes_update(m, s, t, z / temperature, True)
    m, s, t = lanes_reduce(m, s, t, True)
    log_z = safe_shift(m) + tl.log(s)
    token = tl.load(tokens_ptr + row)
    # An out-of-vocabulary token reads nothing and gives NaN (checking on the host would sync).
    z_token = tl.load(base + token, mask=(token >= 0) & (token < n_cols),
                      other=float("nan")) / temperature
    tl.store(logp_ptr + row, z_token - log_z)
    tl.store(entropy_ptr + row, tl.log(s) - t / s)


def row_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperatures: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] fp32 (unit column stride), tokens [R] int64 in [0, V), temperatures [R] fp32 >
    0 -> (log softmax(logits / T)[token], entropy of softmax(logits / T)), both fp32 [R]; NaN
    log-prob for a token outside [0, V)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"row_logprobs: logits must be fp32 [R, V] with unit column stride, got "
                         f"{logits.dtype} {tuple(logits.shape)}")
    rows = logits.shape[0]
    if tokens.shape != (rows,) or tokens.dtype != torch.int64 or temperatures.shape != (rows,) \
            or temperatures.dtype != torch.float32:
        raise ValueError(
            f"row_logprobs: tokens (int64) and temperatures (fp32) must be [{rows}], got "
            f"{tokens.dtype} {tuple(tokens.shape)} and {temperatures.dtype} "
            f"{tuple(temperatures.shape)}")
    return _row_logprobs_op(logits, tokens, temperatures)


@direct_op("fusedrl::row_logprobs", mutates_args=())
def _row_logprobs_op(logits: torch.Tensor, tokens: torch.Tensor, temperatures: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    rows, vocab = logits.shape
    logp = logits.new_empty(rows)
    entropy = logits.new_empty(rows)
    if rows:
        block = min(triton.next_power_of_2(vocab), 4096)
        _row_logprobs_kernel[(rows,)](logits, tokens, temperatures, logp, entropy, vocab,
                                      logits.stride(0), BLOCK_V=block,
                                      num_warps=8 if block >= 2048 else 4)
    return logp, entropy


@_row_logprobs_op.register_fake
def _row_logprobs_fake(logits, tokens, temperatures):
    return logits.new_empty(logits.shape[0]), logits.new_empty(logits.shape[0])
