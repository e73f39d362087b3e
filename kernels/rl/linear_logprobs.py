"""Token log-probs straight from the LM head: token_logprobs(hidden @ weight.T + bias) without
ever holding the [N, V] logits.

Forward takes ``hidden`` in row chunks: a chunk's logits [C, V] (one matmul), reduced by the
token_logprobs kernel and dropped, keeping 3 floats per row (logp, entropy, logsumexp).
Backward takes the vocabulary in column chunks instead: a chunk's logits [N, Vc] are recomputed,
turned into their gradient in place by the token_logprobs backward kernel (the saved logsumexp
makes each column chunk independent), and fed to two matmuls: d weight[chunk] = grad.T @ hidden
is written once, with all N rows as its inner dimension (no read-modify-write of a [V, H] gradient
per chunk, no rounding of a bf16 accumulator), and d hidden += grad @ weight[chunk] accumulates in
fp32 ([N, H], small). Both directions bound the logits buffer by the same element budget
(``chunk_size`` rows of V); the price is one extra matmul (the recompute) in backward.

With ``fuse_matmul`` (the default for 16-bit inputs) the logits are made by Triton GEMMs that use
them in registers (linear_logprobs_kernels.py): forward writes no logits at all (each tile
folded into per-row log-sum-exp states, merged across vocabulary splits by a second small launch);
backward's recompute writes each chunk's gradient once, straight from the accumulators. That removes
the row kernels' passes over the logits (read 2 bytes + write 2 in forward, read 2 + write 2 in
backward per logit, in bf16): about 20 GB at N=16384, V=151936. The two gradient GEMMs stay
cuBLAS's. Without it: cuBLAS's GEMMs and the token_logprobs row kernels, as above.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import checks
from ..dispatch import backend_for, sync_checks_enabled
from .linear_logprobs_torch import chunked_linear_logprobs
from .linear_logprobs_kernels import (N_STATES, _logit_grad_kernel, _lse_combine_kernel,
                                      _lse_partials_kernel)
from .logprobs import check_label_args, token_logprobs_backward, token_logprobs_forward
from .statistics import compute_dtype
from ..triton_compat import triton
from ..direct_ops import direct_op

OP = "linear_token_logprobs"
# Bytes in one chunk of logits, in the dtype they are made in: 32 MiB keeps the head's extra
# memory to a few tens of MiB by default on every device and backend (the row chunks of the
# PyTorch path hold about three such buffers), while the chunks stay whole matmuls (256 fp32 rows
# of a 32k vocabulary; 96 bf16 rows of 152k forward, ~900 of its vocabulary columns at N=16384
# backward).
CHUNK_BYTES = 1 << 25


def default_chunk_size(n_rows: int, vocab_size: int, itemsize: int = 2) -> int:
    """Rows per chunk: CHUNK_BYTES of logits of ``itemsize`` bytes (so memory does not grow with
    N), in steps of 16."""
    rows = max(16, (CHUNK_BYTES // (max(vocab_size, 1) * itemsize)) // 16 * 16)
    return max(1, min(n_rows, rows))


def vocab_chunk_size(n_rows: int, vocab_size: int, chunk_size: int) -> int:
    """Vocabulary columns per backward chunk: at most the forward's chunk_size x V elements over all
    N rows, in steps of 128 columns (whole matmul tiles, 16-byte aligned rows) when there are that
    many. The chunks are made as even as that allows, so the last one is not a sliver (a few
    columns a row: too narrow for 128-bit accesses, a poorly shaped matmul)."""
    budget = max(1, chunk_size * vocab_size // max(n_rows, 1))
    if budget >= vocab_size:
        return vocab_size
    tile = 128 if budget >= 128 else 1
    n_chunks = -(-vocab_size // (budget // tile * tile))
    even = -(-vocab_size // n_chunks)
    return -(-even // tile) * tile


class FusedTiles(NamedTuple):
    """Launch shape of the fused GEMMs: output tile BLOCK_M x BLOCK_N, K steps of BLOCK_K."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


MIN_SPLIT_TILES = 8   # a vocabulary split walks at least this many column tiles
SMS_WITHOUT_GPU = 132  # the split count's SM figure off a GPU (the interpreter): an H100's


def fused_tiles(n_rows: int) -> FusedTiles:
    """The fused GEMMs' tiles for N rows: 128 x 128 outputs (64 x 128 for a few rows) over K steps
    of 64, 8 warps, 3 stages in flight. Not yet timed on a GPU: tests/tools/tune_linear_logprobs.py
    times the alternatives, bench_kernels' "fusedrl cuBLAS" row the unfused way."""
    return FusedTiles(64 if n_rows <= 64 else 128, 128, 64, 8, 3)


def vocab_splits(n_row_tiles: int, vocab: int, n_sms: int, block_n: int = 128) -> tuple[int, int]:
    """(splits, columns per split) of the fused forward: enough (row tile, split) programs for two
    per SM, each split a whole number of block_n-column tiles and at least MIN_SPLIT_TILES of
    them."""
    tiles = triton.cdiv(vocab, block_n)
    wanted = triton.cdiv(2 * n_sms, max(n_row_tiles, 1))
    splits = max(1, min(wanted, tiles // MIN_SPLIT_TILES))
    split_cols = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(vocab, split_cols), split_cols


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SMS_WITHOUT_GPU


def _chunks(total: int, chunk_size: int):
    for start in range(0, total, chunk_size):
        yield start, min(start + chunk_size, total)


def forward_chunks(hidden, weight, bias, labels, temperature, ignore_index, return_entropy,
                   chunk_size):
    """(logp, entropy, lse) [N] fp32 of hidden [N, H] through weight [V, H] (+ bias), ``chunk_size``
    rows at a time: per chunk one matmul and one token_logprobs kernel."""
    n_rows = hidden.shape[0]
    logp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty(n_rows if return_entropy else 0, dtype=torch.float32,
                          device=hidden.device)
    for start, end in _chunks(n_rows, chunk_size):
        logits = F.linear(hidden[start:end], weight, bias)                 # [C, V]
        token_logprobs_forward(logits, labels[start:end], temperature, ignore_index, return_entropy,
                               out=(logp[start:end], entropy[start:end], lse[start:end]))
    return logp, entropy, lse


def forward_fused(hidden, weight, bias, labels, temperature, ignore_index, return_entropy,
                  tiles=None):
    """forward_chunks' outputs from the fused GEMM (no logits in memory): two launches.
    ``tiles``: a FusedTiles (default: fused_tiles(N))."""
    n_rows, k = hidden.shape
    vocab = weight.shape[0]
    logp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty(n_rows if return_entropy else 0, dtype=torch.float32,
                          device=hidden.device)
    if n_rows == 0:
        return logp, entropy, lse
    tiles = tiles or fused_tiles(n_rows)
    n_row_tiles = triton.cdiv(n_rows, tiles.block_m)
    n_splits, split_cols = vocab_splits(n_row_tiles, vocab, _sm_count(hidden.device), tiles.block_n)
    states = torch.empty(N_STATES, n_splits, n_rows, dtype=torch.float32, device=hidden.device)
    _lse_partials_kernel[(n_row_tiles, n_splits)](
        hidden, weight, weight if bias is None else bias, labels, states, n_rows, vocab, split_cols,
        1.0 / temperature, ignore_index, K=k, HAS_BIAS=bias is not None, HAS_ENTROPY=return_entropy,
        INTERPRETED=not hidden.is_cuda, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    _lse_combine_kernel[(n_rows,)](
        states, labels, logp, entropy, lse, n_rows, n_splits, vocab, ignore_index,
        HAS_ENTROPY=return_entropy, SPLITS=triton.next_power_of_2(n_splits))
    return logp, entropy, lse


def fused_logit_grad(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                     temperature, ignore_index, start, end, tiles=None):
    """d loss / d logits [N, end - start] of the vocabulary columns [start, end), hidden's dtype,
    from the fused recompute (one launch). grad_entropy: [N] fp32 or None."""
    n_rows, k = hidden.shape
    grad = torch.empty(n_rows, end - start, dtype=hidden.dtype, device=hidden.device)
    tiles = tiles or fused_tiles(n_rows)
    has_entropy_grad = grad_entropy is not None
    grid = (triton.cdiv(n_rows, tiles.block_m), triton.cdiv(end - start, tiles.block_n))
    _logit_grad_kernel[grid](
        hidden, weight[start:end], weight if bias is None else bias[start:end], labels, lse,
        entropy, grad_logp, grad_entropy if has_entropy_grad else grad_logp, grad, n_rows,
        end - start, start, 1.0 / temperature, ignore_index, K=k, HAS_BIAS=bias is not None,
        HAS_ENTROPY_GRAD=has_entropy_grad, INTERPRETED=not hidden.is_cuda, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages)
    return grad


def head_grads(hidden, weight, bias, columns, need_weight_grad, logit_grad):
    """(d hidden [N, H] in hidden's dtype, d weight [V, H] or [0], d bias [V] or [0]) of a head
    hidden [N, H] @ weight [V, H].T (+ bias) whose logits' gradient comes a vocabulary chunk of
    ``columns`` at a time: logit_grad(start, end) -> [N, end - start] in hidden's dtype. Each chunk
    feeds two matmuls (see the module docstring); d hidden accumulates in fp32."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.empty_like(weight) if need_weight_grad else weight.new_empty(0)
    grad_bias = (torch.empty_like(bias) if bias is not None and need_weight_grad
                 else weight.new_empty(0))
    if n_rows == 0:
        return grad_hidden.to(hidden.dtype), grad_weight.zero_(), grad_bias.zero_()
    for start, end in _chunks(vocab, columns):
        grad_logits = logit_grad(start, end)                                # [N, Vc]
        if need_weight_grad:
            torch.mm(grad_logits.t(), hidden, out=grad_weight[start:end])
            if bias is not None:
                grad_bias[start:end].copy_(grad_logits.sum(dim=0, dtype=torch.float32))
        grad_hidden += torch.mm(grad_logits, weight[start:end])
    return grad_hidden.to(hidden.dtype), grad_weight, grad_bias


def backward_chunks(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                    temperature, ignore_index, chunk_size, need_weight_grad, fuse_matmul):
    """(d hidden [N, H], d weight [V, H] or [0], d bias [V] or [0]) for upstream gradients
    grad_logp, grad_entropy ([N] or [0]) fp32, in vocabulary chunks (see the module docstring)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    grad_logp = grad_logp.float().contiguous()
    grad_entropy = grad_entropy.float().contiguous() if grad_entropy.numel() > 0 else None

    def logit_grad(start, end):
        if fuse_matmul:
            return fused_logit_grad(grad_logp, grad_entropy, hidden, weight, bias, labels, lse,
                                    entropy, temperature, ignore_index, start, end)
        # the chunk's logits [N, Vc], turned into their gradient in place
        grad_logits = F.linear(hidden, weight[start:end], None if bias is None else bias[start:end])
        token_logprobs_backward(grad_logp, grad_entropy, grad_logits, labels, lse, entropy,
                                temperature, ignore_index, out=grad_logits, label_offset=start)
        return grad_logits

    return head_grads(hidden, weight, bias, vocab_chunk_size(n_rows, vocab, chunk_size),
                      need_weight_grad, logit_grad)


@direct_op("fusedrl::linear_token_logprobs_fwd", mutates_args=())
def _fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            labels: torch.Tensor, temperature: float, ignore_index: int, return_entropy: bool,
            chunk_size: int, fuse_matmul: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if fuse_matmul:
        return forward_fused(hidden, weight, bias, labels, temperature, ignore_index,
                             return_entropy)
    return forward_chunks(hidden, weight, bias, labels, temperature, ignore_index, return_entropy,
                          chunk_size)


@_fwd_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, return_entropy, chunk_size,
      fuse_matmul):
    n_rows = hidden.shape[0]
    row = hidden.new_empty(n_rows, dtype=torch.float32)
    return row, hidden.new_empty(n_rows if return_entropy else 0, dtype=torch.float32), row.clone()


@direct_op("fusedrl::linear_token_logprobs_bwd", mutates_args=())
def _bwd_op(grad_logp: torch.Tensor, grad_entropy: torch.Tensor, hidden: torch.Tensor,
            weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
            lse: torch.Tensor, entropy: torch.Tensor, temperature: float, ignore_index: int,
            chunk_size: int, need_weight_grad: bool, fuse_matmul: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward_chunks(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                           temperature, ignore_index, chunk_size, need_weight_grad, fuse_matmul)


@_bwd_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy, temperature,
      ignore_index, chunk_size, need_weight_grad, fuse_matmul):
    n_weight = weight.shape if need_weight_grad else (0,)
    n_bias = weight.shape[0] if bias is not None and need_weight_grad else 0
    return torch.empty_like(hidden), weight.new_empty(n_weight), weight.new_empty(n_bias)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, _, chunk_size, fuse_matmul = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.temperature, ctx.ignore_index, ctx.chunk_size = temperature, ignore_index, chunk_size
    ctx.fuse_matmul = fuse_matmul
    ctx.has_bias = bias is not None


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    if grad_entropy is None:
        grad_entropy = grad_logp.new_empty(0)
    need_weight_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_hidden, grad_weight, grad_bias = _bwd_op(
        grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy, ctx.temperature,
        ctx.ignore_index, ctx.chunk_size, need_weight_grad, ctx.fuse_matmul,
    )
    return (grad_hidden, grad_weight if need_weight_grad else None,
            grad_bias if ctx.has_bias and need_weight_grad else None, None, None, None, None, None,
            None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def check_head_inputs(hidden, weight, bias, labels, temperature, ignore_index, logit_scale=1.0,
                      softcap=None, chunk_size=None, fuse_matmul=None) -> None:
    """linear_token_logprobs' checks of its arguments, each a one-line error (also the checks of
    linear_logprobs_loss): shapes, dtypes, devices and options, and the labels' range where
    dispatch.sync_checks_enabled allows reading it."""
    _check_head_args(hidden, weight, bias, labels, chunk_size, fuse_matmul, logit_scale, softcap)
    check_label_args(OP, labels, temperature, ignore_index)
    if sync_checks_enabled(labels):
        checks.check_label_range(OP, labels, weight.shape[0], ignore_index)


def _check_head_args(hidden, weight, bias, labels, chunk_size, fuse_matmul, logit_scale, softcap):
    """Shapes, dtypes and options of linear_token_logprobs (no tensor value is read)."""
    checks.check_float(OP, "hidden", hidden)
    checks.check_float(OP, "weight", weight)
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{OP}: expected hidden [..., H] and weight [V, H], got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"{OP}: weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        checks.check_float(OP, "bias", bias)
        if bias.shape != (weight.shape[0],) or bias.device != weight.device:
            raise ValueError(f"{OP}: bias must be [{weight.shape[0]}] on {weight.device}, got "
                             f"{tuple(bias.shape)} on {bias.device}")
    if labels.shape != hidden.shape[:-1] or labels.device != hidden.device:
        raise ValueError(f"{OP}: labels must have shape {tuple(hidden.shape[:-1])} (hidden's "
                         f"without H) on {hidden.device}, got {tuple(labels.shape)} on "
                         f"{labels.device}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{OP}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if fuse_matmul is not None and not isinstance(fuse_matmul, bool):
        raise TypeError(f"{OP}: fuse_matmul must be a bool or None, got {fuse_matmul!r}")
    checks.check_positive(OP, "logit_scale", logit_scale)
    if softcap is not None:
        checks.check_positive(OP, "softcap", softcap)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                          ignore_index: int = -100, return_entropy: bool = False,
                          chunk_size: Optional[int] = None, fuse_matmul: Optional[bool] = None,
                          logit_scale: float = 1.0, softcap: Optional[float] = None):
    """token_logprobs(z / temperature, labels) without materializing the logits, where
    z = logit_scale * (hidden @ weight.T + bias), soft-capped to softcap * tanh(z / softcap) when
    softcap is given (Gemma-2's final_logit_softcapping).

    Args:
        hidden: [..., H] fp32/bf16/fp16/fp64 final hidden states ([N, H], or a host's [B, T, H]).
        weight: [V, H] LM head; bias: optional [V]. Mixed dtypes (a 16-bit hidden with an fp32
            head) compute in the wider one; each gradient comes back in its input's dtype.
        labels: [...] (hidden's leading shape) int32/int64 in [0, V) or ignore_index.
        chunk_size: rows per chunk (default: CHUNK_BYTES of logits a chunk, default_chunk_size);
            with ``fuse_matmul``, the backward's vocabulary chunk only (forward keeps no logits).
        fuse_matmul: the logits made and used inside Triton GEMMs (see the module docstring).
            Default: on for 16-bit inputs, off for fp32 (whose fused GEMM multiplies in full fp32
            without tensor cores, so cuBLAS is faster there).
        logit_scale: multiplies the logits before the cap (Cohere's logit_scale; Granite's
            1 / logits_scaling). softcap: None (off) or the cap.
    Returns:
        logp [...] fp32 (fp64 for fp64 inputs), or (logp, entropy) with ``return_entropy``;
        differentiable w.r.t. hidden, weight and bias. The "torch" backend, and soft-capping on
        every backend, run linear_logprobs_torch.py's row chunks (the Triton kernels have no tanh).
    """
    check_head_inputs(hidden, weight, bias, labels, temperature, ignore_index, logit_scale,
                      softcap, chunk_size, fuse_matmul)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    lead = labels.shape
    hidden2d = hidden.to(dtype).reshape(-1, weight.shape[1])
    weight, labels = weight.to(dtype), labels.reshape(-1)
    bias = None if bias is None else bias.to(dtype)
    if backend_for(hidden2d) == "torch" or softcap is not None:
        chunk = chunk_size or default_chunk_size(hidden2d.shape[0], weight.shape[0],
                                                 compute_dtype(hidden2d).itemsize)
        logp, entropy = chunked_linear_logprobs(
            hidden2d, weight, bias, labels, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, chunk_size=chunk, logit_scale=logit_scale,
            softcap=softcap)
    else:
        chunk = chunk_size or default_chunk_size(hidden2d.shape[0], weight.shape[0], dtype.itemsize)
        if fuse_matmul is None:
            fuse_matmul = dtype != torch.float32
        # Without a cap, the scale folds into the temperature: s * z / T = z / (T / s).
        logp, entropy, _ = _fwd_op(
            hidden2d.contiguous(), weight.contiguous(), bias, labels.contiguous(),
            float(temperature) / float(logit_scale), ignore_index, bool(return_entropy), chunk,
            fuse_matmul,
        )
    logp = logp.reshape(lead)
    return (logp, entropy.reshape(lead)) if return_entropy else logp
