"""Fused log-softmax + gather of sampled-token log-probs (and entropy), forward and backward.

Layers: Triton kernels -> host functions (checks, launch) -> torch custom ops with autograd ->
the public ``token_logprobs``.

Forward reads each row of logits once, keeping an online max / sum-exp (and the entropy's
sum p*z) in fp32 per lane (the shared core, kernels/online_softmax.py), and writes three floats per
row: logp, entropy and the row's logsumexp, which backward uses to recompute softmax without a
second reduction. Backward writes only the gradient, in the logits' dtype, optionally into the
logits buffer itself: no fp32 [N, V] tensor ever exists. Rows whose label is ignore_index are
skipped entirely (prompt tokens cost no bandwidth).
"""
from __future__ import annotations

from typing import Optional

import torch
from .. import checks, cuda_ext, reference
from ..online_softmax import lanes_of, lanes_reduce, lanes_update, safe_shift
from ..triton_compat import tl, triton
from ..dispatch import backend_for, sync_checks_enabled
from ..direct_ops import direct_op

OP = "token_logprobs"


@triton.jit
def _row_span(row, stride_row, n_cols, ALIGN: tl.constexpr):
    """A row's elements as absolute offsets from the base pointer: [begin, end), and its aligned
    body [body_begin, body_end), both ends multiples of ALIGN elements (16 bytes). Loads in the body
    carry no mask that breaks 16-byte groups, so they vectorize even when V is not a multiple of 16
    (GPT-2's 50257); the few elements outside it go through `_edge_cols`."""
    begin = row * stride_row
    end = begin + n_cols
    body_begin = tl.multiple_of((begin + ALIGN - 1) // ALIGN * ALIGN, ALIGN)
    body_end = tl.multiple_of(tl.maximum(end // ALIGN * ALIGN, body_begin), ALIGN)
    return begin, end, body_begin, body_end


@triton.jit
def _edge_cols(begin, end, body_begin, body_end, ALIGN: tl.constexpr, WIDTH: tl.constexpr):
    """(offsets, mask) [WIDTH >= 2 * ALIGN] of a row's elements outside its aligned body: the head
    [begin, body_begin) in lanes [0, ALIGN) and the tail [body_end, end) in lanes [ALIGN, 2 *
    ALIGN); lanes past 2 * ALIGN are masked off. A row shorter than ALIGN is all head."""
    h = tl.arange(0, WIDTH)
    cols = tl.where(h < ALIGN, body_begin - ALIGN + h, body_end + h - ALIGN)
    head = (h < ALIGN) & (cols >= begin) & (cols < end)
    tail = (h >= ALIGN) & (h < 2 * ALIGN) & (cols < end)
    return cols, head | tail


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,       # [N, V] fp32/bf16/fp16/fp64, last dim contiguous
    labels_ptr,       # [N] int32/int64
    logp_ptr,         # [N] fp32 out: log p(label)
    entropy_ptr,      # [N] fp32 out (written only if HAS_ENTROPY)
    lse_ptr,          # [N] fp32 out: logsumexp of the scaled row, saved for backward
    stride_row,       # elements between consecutive rows of logits
    n_cols,           # V
    inv_temperature,  # 1 / temperature
    ignore_index,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr,  # elements in 16 bytes of logits
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
    else:
        begin, end, body_begin, body_end = _row_span(row, stride_row, n_cols, ALIGN)
        # The lanes start from the row's unaligned head and tail (one logit per lane), then fold
        # in the aligned body block by block; no cross-lane work until the row is read.
        edge_cols, edge = _edge_cols(begin, end, body_begin, body_end, ALIGN, BLOCK_V)
        z_edge = tl.load(logits_ptr + edge_cols, mask=edge, other=float("-inf")).to(tl.float32)
        m, s, t = lanes_of(z_edge * inv_temperature)
        # Each step issues the next block's load before folding in the current one: two blocks in
        # flight per warp (the last step's load is all masked and reads nothing).
        cols = body_begin + tl.arange(0, BLOCK_V)
        x_next = tl.load(logits_ptr + cols, mask=cols < body_end, other=float("-inf"))
        for start in range(0, body_end - body_begin, BLOCK_V):
            x = x_next
            cols += BLOCK_V
            x_next = tl.load(logits_ptr + cols, mask=cols < body_end, other=float("-inf"))
            m, s, t = lanes_update(m, s, t, x.to(tl.float32) * inv_temperature, HAS_ENTROPY)
        m, s, t = lanes_reduce(m, s, t, HAS_ENTROPY)
        lse = safe_shift(m) + tl.log(s)
        in_vocab = (label >= 0) & (label < n_cols)
        z_label = tl.load(logits_ptr + begin + label, mask=in_vocab,
                          other=float("nan")).to(tl.float32)
        # An out-of-vocabulary label (possible only when the host checks were skipped) gives NaN.
        tl.store(logp_ptr + row, z_label * inv_temperature - lse)
        tl.store(lse_ptr + row, lse)
        if HAS_ENTROPY:
            # H = lse - E[z] with the sums centred on m: log s - t / s.
            tl.store(entropy_ptr + row, tl.log(s) - t / s)


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,        # [N, V] as in forward
    labels_ptr,        # [N]
    lse_ptr,           # [N] fp32 from forward
    entropy_ptr,       # [N] fp32 from forward (read only if HAS_ENTROPY_GRAD)
    grad_logp_ptr,     # [N] fp32 upstream gradient of logp
    grad_entropy_ptr,  # [N] fp32 upstream gradient of entropy (read only if HAS_ENTROPY_GRAD)
    grad_logits_ptr,   # [N, V] out, logits' dtype and strides; may be logits_ptr (in place)
    stride_row,        # of logits and grad_logits alike
    n_cols,
    label_offset,      # the vocabulary column of logits' first column (a slice of the vocabulary)
    inv_temperature,
    ignore_index,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    # An ignored row reads no logits and writes a zero gradient. A row-uniform flag in the load
    # mask keeps the loads vectorized.
    live = label != ignore_index
    begin, end, body_begin, body_end = _row_span(row, stride_row, n_cols, ALIGN)
    lse = tl.load(lse_ptr + row)
    g_logp = tl.load(grad_logp_ptr + row)
    entropy = 0.0
    g_entropy = 0.0
    if HAS_ENTROPY_GRAD:
        entropy = tl.load(entropy_ptr + row)
        g_entropy = tl.load(grad_entropy_ptr + row)
    edge_cols, edge = _edge_cols(begin, end, body_begin, body_end, ALIGN, 2 * ALIGN)
    # A label outside this slice of the vocabulary matches no column: its one-hot term is 0 here.
    label_col = begin + label - label_offset
    _grad_block(logits_ptr, grad_logits_ptr, edge_cols, edge, live, label_col, lse, g_logp,
                entropy, g_entropy, inv_temperature, HAS_ENTROPY_GRAD)
    for start in range(0, body_end - body_begin, BLOCK_V):
        cols = body_begin + start + tl.arange(0, BLOCK_V)
        _grad_block(logits_ptr, grad_logits_ptr, cols, cols < body_end, live, label_col, lse,
                    g_logp, entropy, g_entropy, inv_temperature, HAS_ENTROPY_GRAD)


@triton.jit
def _grad_block(logits_ptr, grad_ptr, cols, mask, live, label_col, lse, g_logp, entropy,
                g_entropy, inv_temperature, HAS_ENTROPY_GRAD: tl.constexpr):
    """Gradient of one block of a row: `cols` are offsets into logits and grad alike, `label_col`
    the label's; all zero unless `live`."""
    # (a scalar `&` a block mask trips the interpreter; the select is the same mask)
    z = tl.load(logits_ptr + cols, mask=tl.where(live, mask, False),
                other=float("-inf")).to(tl.float32)
    grad_z = logit_grad(z * inv_temperature, cols == label_col, lse, g_logp, entropy, g_entropy,
                        HAS_ENTROPY_GRAD)
    grad = tl.where(live, grad_z * inv_temperature, 0.0)
    tl.store(grad_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def logit_grad(z, is_label, lse, g_logp, entropy, g_entropy, HAS_ENTROPY_GRAD: tl.constexpr):
    """d(g_logp * logp + g_entropy * H) / dz for scaled logits z (any shape; the row's scalars lse,
    entropy and upstream gradients broadcast against it). Shared with the LM head's fused
    backward."""
    log_p = z - lse
    p = tl.exp(log_p)
    # d logp / dz = onehot(label) - p
    grad_z = g_logp * (tl.where(is_label, 1.0, 0.0) - p)
    if HAS_ENTROPY_GRAD:
        # dH/dz = -p * (log p + H); 0 for a -inf logit (p = 0), not 0 * -inf.
        grad_z -= g_entropy * tl.where(z == float("-inf"), 0.0, p * (log_p + entropy))
    return grad_z


def _launch_config(logits: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of ``logits``: 4096 logits a block (16 per thread, two 128-bit
    loads in bf16) over 8 warps for large vocabularies; at least the 2 * 16 bytes of a row's
    edges."""
    block = max(min(triton.next_power_of_2(logits.shape[-1]), 4096), 2 * _align(logits))
    return block, (8 if block >= 2048 else 4)


def _align(logits: torch.Tensor) -> int:
    """Elements of ``logits`` in 16 bytes: the unit of a 128-bit access."""
    return max(1, 16 // logits.element_size())


def grad_buffer(logits: torch.Tensor) -> torch.Tensor:
    """An uninitialized buffer for d(loss)/d(logits) with logits' strides (the kernel walks both
    with one offset, which keeps their accesses aligned alike)."""
    return torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype,
                               device=logits.device)


def token_logprobs_forward(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                           ignore_index: int, return_entropy: bool, out=None):
    """Host launcher. logits [N, V] (last dim contiguous), labels [N] ->
    (logp [N] fp32, entropy [N] fp32 or [0], lse [N] fp32), written into ``out`` (three contiguous
    fp32 tensors of those sizes, e.g. slices of larger outputs) when given."""
    n_rows, n_cols = logits.shape
    if out is None:
        row = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        out = (row, row.new_empty(n_rows if return_entropy else 0), torch.empty_like(row))
    logp, entropy, lse = out
    if n_rows == 0:
        return logp, entropy, lse
    block, num_warps = _launch_config(logits)
    _token_logprobs_fwd_kernel[(n_rows,)](
        logits, labels, logp, entropy, lse, logits.stride(0), n_cols, 1.0 / temperature,
        ignore_index, HAS_ENTROPY=return_entropy, BLOCK_V=block, ALIGN=_align(logits),
        num_warps=num_warps,
    )
    return logp, entropy, lse


def token_logprobs_backward(grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor],
                            logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                            entropy: torch.Tensor, temperature: float, ignore_index: int,
                            out: torch.Tensor, label_offset: int = 0) -> torch.Tensor:
    """Host launcher. Writes d(loss)/d(logits) [N, V] into ``out`` (``logits`` itself, or a buffer
    of its dtype and strides: see ``grad_buffer``). ``logits`` may be the columns
    [label_offset, label_offset + V) of the full rows that ``lse`` and ``entropy`` [N] describe."""
    n_rows, n_cols = logits.shape
    if out.stride() != logits.stride() or out.dtype != logits.dtype:
        raise ValueError("token_logprobs backward: out must have logits' dtype and strides")
    if n_rows == 0:
        return out
    has_entropy_grad = grad_entropy is not None and grad_entropy.numel() > 0
    block, num_warps = _launch_config(logits)
    _token_logprobs_bwd_kernel[(n_rows,)](
        logits, labels, lse, entropy, grad_logp.float().contiguous(),
        grad_entropy.float().contiguous() if has_entropy_grad else grad_logp, out,
        logits.stride(0), n_cols, label_offset, 1.0 / temperature, ignore_index,
        HAS_ENTROPY_GRAD=has_entropy_grad, BLOCK_V=block, ALIGN=_align(logits), num_warps=num_warps,
    )
    return out


@direct_op("fusedrl::token_logprobs_fwd", mutates_args=())
def _fwd_op(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
            return_entropy: bool, inplace_backward: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    return token_logprobs_forward(logits, labels, temperature, ignore_index, return_entropy)


@_fwd_op.register_fake
def _fwd_fake(logits, labels, temperature, ignore_index, return_entropy, inplace_backward):
    n_rows = logits.shape[0]
    row = logits.new_empty(n_rows, dtype=torch.float32)
    return row, logits.new_empty(n_rows if return_entropy else 0, dtype=torch.float32), row.clone()


@direct_op("fusedrl::token_logprobs_bwd", mutates_args=())
def _bwd_op(grad_logp: torch.Tensor, grad_entropy: torch.Tensor, logits: torch.Tensor,
            labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor, temperature: float,
            ignore_index: int) -> torch.Tensor:
    return token_logprobs_backward(grad_logp, grad_entropy, logits, labels, lse, entropy,
                                   temperature, ignore_index, out=grad_buffer(logits))


@_bwd_op.register_fake
def _bwd_fake(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    return grad_buffer(logits)


@direct_op("fusedrl::token_logprobs_bwd_inplace", mutates_args=("logits",))
def _bwd_inplace_op(grad_logp: torch.Tensor, grad_entropy: torch.Tensor, logits: torch.Tensor,
                    labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                    temperature: float, ignore_index: int) -> None:
    token_logprobs_backward(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature,
                            ignore_index, out=logits)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, _, inplace_backward = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.temperature, ctx.ignore_index = temperature, ignore_index
    ctx.inplace_backward = inplace_backward


_TRITON_OPS = {"token_logprobs_fwd": _fwd_op, "token_logprobs_bwd": _bwd_op,
               "token_logprobs_bwd_inplace": _bwd_inplace_op}


def _op(backend: str, name: str):
    """The op running `name` on a fused backend: ours on "triton" (a DirectOp: eager calls skip the
    custom-op wrapper), its C++ twin fusedrl::cuda_<name> (the same schema) on "cuda"."""
    return _TRITON_OPS[name] if backend == "triton" else getattr(torch.ops.fusedrl, f"cuda_{name}")


def _backward_on(backend: str):
    """The autograd formula of the forward op of ``backend``: its own backward op."""
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        logits, labels, lse, entropy = ctx.saved_tensors
        if grad_entropy is None:
            grad_entropy = grad_logp.new_empty(0)
        args = (grad_logp, grad_entropy, logits, labels, lse, entropy, ctx.temperature,
                ctx.ignore_index)
        if ctx.inplace_backward:
            _op(backend, "token_logprobs_bwd_inplace")(*args)
            grad_logits = logits
        else:
            grad_logits = _op(backend, "token_logprobs_bwd")(*args)
        return grad_logits, None, None, None, None, None
    return backward


_fwd_op.register_autograd(_backward_on("triton"), setup_context=_setup_context)


def register_cuda_rules() -> None:
    """Fake implementations and autograd of the C++ twins fusedrl::cuda_token_logprobs_*."""
    torch.library.register_fake("fusedrl::cuda_token_logprobs_fwd", _fwd_fake)
    torch.library.register_fake("fusedrl::cuda_token_logprobs_bwd", _bwd_fake)
    torch.library.register_fake("fusedrl::cuda_token_logprobs_bwd_inplace", lambda *args: None)
    torch.library.register_autograd("fusedrl::cuda_token_logprobs_fwd", _backward_on("cuda"),
                                    setup_context=_setup_context)


cuda_ext.on_load(register_cuda_rules)


def check_label_args(op: str, labels: torch.Tensor, temperature: float, ignore_index: int) -> None:
    """Checks shared with linear_token_logprobs: label dtype, temperature, ignore_index."""
    checks.check_dtype(op, "labels", labels, checks.INDEX_DTYPES)
    checks.check_positive(op, "temperature", temperature)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, return_entropy: bool = False,
                   inplace_backward: bool = False):
    """Log-probability of each label under softmax(logits / temperature), fused.

    Args:
        logits: [..., V] fp32/bf16/fp16 (fp64 is accepted: computed in fp32 by the fused
            kernels, in fp64 by the torch backend, returned in fp32 by both).
        labels: [...] int32/int64, each in [0, V) or equal to ``ignore_index``.
        temperature: positive; the distribution is softmax(logits / temperature).
        ignore_index: label value whose outputs (and gradients) are 0.
        return_entropy: also return the entropy of softmax(logits / temperature).
        inplace_backward: backward overwrites ``logits`` with its gradient (saves one [N, V]
            buffer; ``logits`` must not be used after backward). Fused backends only (the torch
            reference ignores it).
    Returns:
        logp [...] fp32, or (logp, entropy) [...] fp32 with ``return_entropy``. Differentiable
        w.r.t. logits through both.
    """
    checks.check_float(OP, "logits", logits)
    check_label_args(OP, labels, temperature, ignore_index)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"{OP}: logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{OP}: labels must have shape {tuple(logits.shape[:-1])} (logits' leading dims), "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"{OP}: labels are on {labels.device} but logits are on {logits.device}")
    n_cols = logits.shape[-1]
    if sync_checks_enabled(labels):
        checks.check_label_range(OP, labels, n_cols, ignore_index)
    backend = cuda_ext.twin_or_fallback(backend_for(logits, OP), logits)
    if backend == "torch":
        # The reference keeps fp64 inputs in fp64 (the oracle's precision); the op returns fp32 on
        # every backend, as its fused kernels do.
        out = reference.token_logprobs(logits, labels, temperature=temperature,
                                       ignore_index=ignore_index, return_entropy=return_entropy)
        if return_entropy:
            return out[0].to(torch.float32), out[1].to(torch.float32)
        return out.to(torch.float32)
    logits_2d = logits.reshape(-1, n_cols)
    if logits_2d.stride(-1) != 1:
        logits_2d = logits_2d.contiguous()
    logp, entropy, _ = _op(backend, "token_logprobs_fwd")(
        logits_2d, labels.reshape(-1).contiguous(), float(temperature), ignore_index,
        bool(return_entropy),
        bool(inplace_backward),
    )
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp
