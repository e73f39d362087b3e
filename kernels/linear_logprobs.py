"""Token log-probs straight from the LM head: token_logprobs(hidden @ weight.T + bias) without
ever holding the [N, V] logits.

Rows of ``hidden`` are processed in chunks. Forward computes a chunk's logits, reduces them with
the token_logprobs kernel and drops them, keeping 3 floats per row. Backward recomputes the
chunk's logits, turns them into their gradient in place with the token_logprobs backward kernel,
and feeds that to two matmuls. Peak extra memory is one [chunk, V] buffer plus the weight's
gradient, whatever N is; the price is one extra matmul (the recompute) in backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import checks, reference
from .dispatch import backend_for, sync_checks_enabled
from .logprobs import check_label_args, token_logprobs_backward, token_logprobs_forward

OP = "linear_token_logprobs"
# Elements in one chunk of logits: 2**26 bf16 values are 128 MiB, large enough that the chunk's
# matmul runs near peak even for a 152k vocabulary (~440 rows).
CHUNK_ELEMENTS = 1 << 26


def default_chunk_size(n_rows: int, vocab_size: int) -> int:
    """Rows per chunk: a fixed element budget (so memory does not grow with N), in steps of 16."""
    rows = max(16, (CHUNK_ELEMENTS // max(vocab_size, 1)) // 16 * 16)
    return max(1, min(n_rows, rows))


def _chunks(n_rows: int, chunk_size: int):
    for start in range(0, n_rows, chunk_size):
        yield start, min(start + chunk_size, n_rows)


@torch.library.custom_op("fusedrl::linear_token_logprobs_fwd", mutates_args=())
def _fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            labels: torch.Tensor, temperature: float, ignore_index: int, return_entropy: bool,
            chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    outputs = []
    for start, end in _chunks(hidden.shape[0], chunk_size):
        logits = F.linear(hidden[start:end], weight, bias)                 # [C, V]
        outputs.append(token_logprobs_forward(logits, labels[start:end], temperature,
                                              ignore_index, return_entropy))
    if not outputs:
        return token_logprobs_forward(hidden.new_empty(0, weight.shape[0]), labels, temperature,
                                      ignore_index, return_entropy)
    logp, entropy, lse = (torch.cat(parts) for parts in zip(*outputs))
    return logp, entropy, lse


@_fwd_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, return_entropy, chunk_size):
    n_rows = hidden.shape[0]
    row = hidden.new_empty(n_rows, dtype=torch.float32)
    return row, hidden.new_empty(n_rows if return_entropy else 0, dtype=torch.float32), row.clone()


@torch.library.custom_op("fusedrl::linear_token_logprobs_bwd", mutates_args=())
def _bwd_op(grad_logp: torch.Tensor, grad_entropy: torch.Tensor, hidden: torch.Tensor,
            weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
            lse: torch.Tensor, entropy: torch.Tensor, temperature: float, ignore_index: int,
            chunk_size: int, need_weight_grad: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_hidden = torch.empty_like(hidden)
    # Accumulated in the weight's dtype, as the LM head's own backward would store it; each
    # chunk's matmul accumulates in fp32 internally.
    grad_weight = torch.zeros_like(weight) if need_weight_grad else weight.new_empty(0)
    grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
        if bias is not None and need_weight_grad else weight.new_empty(0)
    has_entropy_grad = grad_entropy.numel() > 0
    for start, end in _chunks(hidden.shape[0], chunk_size):
        h = hidden[start:end]                                               # [C, H]
        logits = F.linear(h, weight, bias)                                  # [C, V], becomes its grad
        token_logprobs_backward(
            grad_logp[start:end], grad_entropy[start:end] if has_entropy_grad else None, logits,
            labels[start:end], lse[start:end], entropy[start:end] if has_entropy_grad else entropy,
            temperature, ignore_index, out=logits,
        )
        torch.mm(logits, weight, out=grad_hidden[start:end])
        if need_weight_grad:
            grad_weight.addmm_(logits.t(), h)
            if bias is not None:
                grad_bias += logits.sum(dim=0, dtype=torch.float32)
    return grad_hidden, grad_weight, grad_bias.to(weight.dtype)


@_bwd_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy, temperature,
      ignore_index, chunk_size, need_weight_grad):
    n_weight = weight.shape if need_weight_grad else (0,)
    n_bias = weight.shape[0] if bias is not None and need_weight_grad else 0
    return torch.empty_like(hidden), weight.new_empty(n_weight), weight.new_empty(n_bias)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, _, chunk_size = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.temperature, ctx.ignore_index, ctx.chunk_size = temperature, ignore_index, chunk_size
    ctx.has_bias = bias is not None


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    if grad_entropy is None:
        grad_entropy = grad_logp.new_empty(0)
    need_weight_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_hidden, grad_weight, grad_bias = torch.ops.fusedrl.linear_token_logprobs_bwd(
        grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy, ctx.temperature,
        ctx.ignore_index, ctx.chunk_size, need_weight_grad,
    )
    return (grad_hidden, grad_weight if need_weight_grad else None,
            grad_bias if ctx.has_bias and need_weight_grad else None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                          ignore_index: int = -100, return_entropy: bool = False,
                          chunk_size: Optional[int] = None):
    """token_logprobs(hidden @ weight.T + bias, labels) without materializing the logits.

    Args:
        hidden: [N, H] fp32/bf16/fp16 final hidden states.
        weight: [V, H] LM head, same dtype as hidden. bias: optional [V].
        labels: [N] int32/int64 in [0, V) or ignore_index.
        chunk_size: rows per chunk (default: a fixed ~2**26-element budget of logits).
    Returns:
        logp [N] fp32, or (logp, entropy) with ``return_entropy``; differentiable w.r.t. hidden,
        weight and bias. The "torch" backend is the reference composition (logits materialized).
    """
    checks.check_float(OP, "hidden", hidden)
    checks.check_float(OP, "weight", weight)
    check_label_args(OP, labels, temperature, ignore_index)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{OP}: expected hidden [N, H] and weight [V, H], got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError(f"{OP}: weight must match hidden's dtype and device ({hidden.dtype}, "
                        f"{hidden.device}), got {weight.dtype} on {weight.device}")
    if bias is not None:
        checks.check_tensor(OP, "bias", bias)
        if bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype:
            raise ValueError(f"{OP}: bias must be [{weight.shape[0]}] {weight.dtype}, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
    if labels.shape != hidden.shape[:1] or labels.device != hidden.device:
        raise ValueError(f"{OP}: labels must have shape ({hidden.shape[0]},) on {hidden.device}, "
                         f"got {tuple(labels.shape)} on {labels.device}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{OP}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if sync_checks_enabled(labels):
        checks.check_label_range(OP, labels, weight.shape[0], ignore_index)
    if backend_for(hidden) == "torch":
        return reference.linear_token_logprobs(hidden, weight, labels, bias=bias,
                                               temperature=temperature, ignore_index=ignore_index,
                                               return_entropy=return_entropy)
    chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0])
    logp, entropy, _ = torch.ops.fusedrl.linear_token_logprobs_fwd(
        hidden.contiguous(), weight.contiguous(), bias, labels.contiguous(), float(temperature),
        ignore_index, bool(return_entropy), chunk,
    )
    return (logp, entropy) if return_entropy else logp
