"""Fixed-order primitives of the batch-invariant mode: each output element is one fixed expression
of its own inputs, whatever the number of rows, their order or what else is in the tensor.

How that holds by construction:
- Reductions are never handed to a library reduction (whose split across threads, SIMD lanes or
  split-K depends on the tensor's shape): `tree_sum` / `tree_max` pad the reduced dim to a power of
  two and halve it with whole-tensor elementwise adds (maxima). An element's sum is then the same
  binary tree over the same operands on every call; only the width of the reduced dim fixes it.
- Matmuls are elementwise products followed by `tree_sum` over K (`linear`): no BLAS, no tiles.
- Elementwise ops are IEEE-exact (add, mul, div, sqrt, max) except the transcendental ones (exp,
  log). Those go through `pointwise`: on the CPU torch evaluates a contiguous tensor in SIMD vectors
  and, for some ops, its tail (or a thread's chunk's tail) with a scalar libm call, which may differ
  by an ulp (F.silu does: torch 2.13, AVX2, 4 of the last 103 of 100003 values differ from the same
  value computed alone; silu here is x / (1 + exp(-x)) for that reason); padded
  to a multiple of `LANES` and cut into pieces below torch's parallel grain, every element takes the
  vector path. CUDA evaluates every element with the same instructions, so there it is a plain call.

Holds on the CPU (tested) and, by the same construction, on CUDA (not yet tested on a GPU). The cost
on the CPU is memory and time: `linear` materializes [rows, out, K] products (in pieces of at most
`PRODUCT_ELEMENTS`), fine for the tiny models of the tests. Where the fused kernels run
(kernels.dispatch.model_backend: CUDA), the exact ops (this package's `__init__`) take the
fixed-tile Triton matmul of `fixed_tile_matmul.py` instead (no products materialized).
"""
from __future__ import annotations

import torch

# Elements padded to a multiple of this before a transcendental op: whole SIMD vectors (AVX-512
# holds 16 fp32, torch's loop takes two at a time), so no element falls to the scalar tail.
LANES = 64
# Elements per transcendental call on the CPU: below torch's parallel grain (32768), one serial
# pass.
PIECE = 16384
# Products materialized at once by `linear` (64 MiB of fp32).
PRODUCT_ELEMENTS = 1 << 24


def _tree(x: torch.Tensor, dim: int, pad_value: float, combine) -> torch.Tensor:
    width = x.shape[dim]
    if width == 0:
        raise ValueError(f"cannot reduce over an empty dim {dim} of shape {tuple(x.shape)}")
    full = 1 << (width - 1).bit_length()
    if full != width:
        pad_shape = list(x.shape)
        pad_shape[dim] = full - width
        x = torch.cat([x, x.new_full(pad_shape, pad_value)], dim)
    while full > 1:
        full //= 2
        x = combine(x.narrow(dim, 0, full), x.narrow(dim, full, full))
    return x.squeeze(dim)


def tree_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x [..., W, ...] -> sum over `dim`, as a fixed binary tree of elementwise adds (zeros pad W to
    a power of two). An element's result depends on W and its own W operands only."""
    return _tree(x, dim, 0.0, torch.add)


def tree_max(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x [..., W, ...] -> max over `dim`, by the same fixed tree as `tree_sum` (-inf pads)."""
    return _tree(x, dim, float("-inf"), torch.maximum)


def pointwise(fn, x: torch.Tensor) -> torch.Tensor:
    """fn (a transcendental elementwise torch op) applied so that each element's result depends on
    its value only: see the module docstring. x any shape -> fn(x), same shape."""
    if x.is_cuda:
        return fn(x)
    flat = x.reshape(-1)
    n = flat.numel()
    padded = torch.cat([flat, flat.new_zeros(-n % LANES)])
    out = torch.cat([fn(piece) for piece in padded.split(PIECE)]) if n else padded
    return out[:n].view(x.shape)


def exp(x: torch.Tensor) -> torch.Tensor:
    """Elementwise exp, invariant to the tensor's shape (`pointwise`)."""
    return pointwise(torch.exp, x)


def log(x: torch.Tensor) -> torch.Tensor:
    """Elementwise log, invariant to the tensor's shape (`pointwise`)."""
    return pointwise(torch.log, x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [N, K] @ weight [O, K].T (+ bias [O]) -> [N, O] in out_dtype (default x's): fp32 products,
    `tree_sum` over K, bias added in fp32, one rounding at the end. Rows and output columns are cut
    into pieces of at most PRODUCT_ELEMENTS products; each element's tree spans all of K, so the
    cut changes nothing. Where the fused kernels run, the exact `linear` takes `linear_fixed_tiles`
    instead, invariant by its fixed tiles."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear: expected x [N, K] and weight [O, K], got x {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}")
    n, k = x.shape
    o = weight.shape[0]
    # K outermost: the tree's halves are contiguous slabs, so its adds stream through memory.
    w_t = weight.float().t()[:, None, :]  # [K, 1, O]
    x_t = x.float().t()[:, :, None]  # [K, N, 1]
    cols = max(1, min(o, PRODUCT_ELEMENTS // k))
    rows = max(1, PRODUCT_ELEMENTS // (cols * k))
    out = torch.empty(n, o, dtype=torch.float32, device=x.device)
    for r in range(0, n, rows):
        for c in range(0, o, cols):
            out[r:r + rows, c:c + cols] = tree_sum(x_t[:, r:r + rows] * w_t[:, :, c:c + cols], 0)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype or x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., C], in transformers' order (fp32 statistics, rounded to
    x's dtype before the weight), with the mean of squares as a `tree_sum` and 1 / sqrt (both
    exact)."""
    xf = x.float()
    mean_sq = tree_sum(xf * xf, -1) / x.shape[-1]
    normed = xf * (1.0 / torch.sqrt(mean_sq + eps))[..., None]
    return weight * normed.to(x.dtype)


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) = x / (1 + exp(-x)) in fp32, rounded to x's dtype."""
    xf = x.float()
    return (xf / (1.0 + exp(-xf))).to(x.dtype)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperatures: torch.Tensor,
                   with_entropy: bool = False):
    """log softmax(logits / temperature)[token] per row: logits [R, V] fp32, tokens [R] int64,
    temperatures [R] fp32 (> 0) -> fp32 [R] (and the entropy [R] with_entropy). Max and sum are
    fixed trees over V; the division is by a tensor (a Python scalar may become a reciprocal
    multiply on some devices, and then the two callers would differ)."""
    scaled = logits / temperatures[:, None]
    shifted = scaled - tree_max(scaled, -1)[:, None]
    probs = exp(shifted)  # unnormalized
    z = tree_sum(probs, -1)
    log_z = log(z)
    logp = shifted.gather(1, tokens[:, None]).squeeze(1) - log_z
    if not with_entropy:
        return logp
    return logp, log_z - tree_sum(probs * shifted, -1) / z  # H = log Z - E[shifted]
