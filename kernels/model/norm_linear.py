"""A decode step's RMSNorm (with the residual add) as the prologue of the projection that follows
it, and the MLP's SiLU * up as the epilogue of the packed gate/up projection: one launch where the
unfused step spends two (norm, q/k/v GEMM) or three (norm, gate/up GEMM, SiLU * up).

    y, s = norm_linear(x, residual, norm_weight, eps, weight, bias)          # q/k/v
    h, s = norm_linear(x, residual, norm_weight, eps, weight, bias, glu=True)  # SiLU(gate) * up

Each program owns a [BLOCK_M, BLOCK_N] tile of the output and walks K once: s = x + residual
(rounded to the activation dtype; the programs of the first column tile write it, the new residual
stream), its squares summed beside the GEMM, and round(norm_weight * s) fed to the tensor-core dot
against the weight's tile. RMSNorm scales each row by rstd = 1 / sqrt(mean(s^2) + eps), which
commutes with the GEMM ((diag(rstd) S diag(w)) W^T = diag(rstd) (S diag(w) W^T)), so rstd
multiplies the fp32 accumulator after the loop. A first pass over K for the statistics would put
K / BLOCK_K dependent loads and reductions ahead of the first weight load in every program: at
decode (a few rows, a few microseconds a call) that latency was the kernel's largest share. The
rounding differs from the unfused norm's (which rounds s * rstd before the weight) by a rounding
of the same size, in another place. With glu the program holds the gate and the up columns of the
same outputs (rows j and C + j of the packed weight) and writes round(round(SiLU(gate)) * up), as
swiglu.py does.

Forward only: the decoder uses it in decode steps (no autograd; the training and scoring forwards
keep the norm and cuBLAS's GEMM, whose numbers the update differentiates). Runs where the
model's fused kernels run (`dispatch.fused_for_model`). Custom op
fusedrl::norm_linear, one op to torch.compile, CUDA graphs and a TorchDispatchMode;
`reference.norm_linear` is its oracle and the backend elsewhere.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import checks, reference
from ..dispatch import fused_for_model
from ..tile_dot import dot_nt
from ..triton_compat import tl, triton
from ..direct_ops import direct_op


@triton.jit
def _residual_sum(x_ptr, res_ptr, offs, mask, HAS_RESIDUAL: tl.constexpr):
    """s = x + residual rounded to the activation dtype, as `x + residual` in torch (x alone without
    one)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(
            x.dtype)
    return x


@triton.jit(do_not_specialize=["n_rows"])
def _norm_linear_kernel(
    x_ptr,  # [M, K] contiguous
    res_ptr,  # [M, K] residual (read only if HAS_RESIDUAL)
    sum_ptr,  # [M, K] out: x + residual (written only if HAS_RESIDUAL)
    norm_w_ptr,  # [K]
    w_ptr,  # [N_W, K] contiguous: the projection's weight (glu: gate rows then up rows, N_W = 2 N)
    bias_ptr,  # [N_W] (read only if HAS_BIAS)
    out_ptr,  # [M, N] out
    n_rows,  # M
    n_out,  # N
    eps,
    K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr,
    INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_out
    kk = tl.arange(0, BLOCK_K)
    # One pass over K: the weight-scaled rows (not yet normalized) into the dot, their squares
    # summed beside it (elementwise: one reduction after the loop), the new residual stream written
    # by the programs of the first column tile. RMSNorm scales each row by its rstd, which commutes
    # with the GEMM, so it is applied to the accumulator after the loop.
    squares = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GLU:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        offs = rows[:, None] * K + (k0 + kk)[None, :]
        mask = row_ok[:, None] & k_ok[None, :]
        s = _residual_sum(x_ptr, res_ptr, offs, mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            if pid_n == 0:
                tl.store(sum_ptr + offs, s, mask=mask)
        sf = s.to(tl.float32)
        squares += sf * sf
        nw = tl.load(norm_w_ptr + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
        a = (nw[None, :] * sf).to(w_ptr.dtype.element_ty)  # [BLOCK_M, BLOCK_K]
        w_mask = col_ok[:, None] & k_ok[None, :]
        w_offs = cols[:, None].to(tl.int64) * K + (k0 + kk)[None, :]
        w = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0)  # [BLOCK_N, BLOCK_K]
        acc = dot_nt(a, w, acc, INTERPRETED)
        if GLU:
            w_up = tl.load(w_ptr + w_offs + n_out * K, mask=w_mask, other=0.0)
            acc_up = dot_nt(a, w_up, acc_up, INTERPRETED)
    rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=1) / K + eps)  # [BLOCK_M]
    acc = acc * rstd[:, None]
    if GLU:
        acc_up = acc_up * rstd[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GLU:
            acc_up += tl.load(bias_ptr + n_out + cols, mask=col_ok, other=0.0).to(tl.float32)[None,
                                                                                              :]
    dtype = out_ptr.dtype.element_ty
    if GLU:
        # The GEMM's outputs rounded as the unfused GEMM writes them, then SiLU rounded before the
        # product.
        gate = acc.to(dtype).to(tl.float32)
        silu = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        result = silu * acc_up.to(dtype).to(tl.float32)
    else:
        result = acc
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + rows[:, None] * n_out + cols[None, :], result.to(dtype), mask=out_mask)


class Tiles(NamedTuple):
    """A launch's output tile BLOCK_M x BLOCK_N and K step BLOCK_K, and Triton's warps and pipeline
    stages (None: Triton's defaults, 4 and 3 on an H100). A row tile of 16 or more takes the tensor
    cores; fewer (a GEMV's 1) sums the products on the CUDA cores (tile_dot.dot_nt)."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None

    def options(self) -> dict:
        """The launch keywords this shape sets (none for Triton's defaults)."""
        return {k: v for k, v in (("num_warps", self.num_warps), ("num_stages", self.num_stages))
                if v is not None}


def tile_shape(rows: int, out_features: int) -> Tiles:
    """The Tiles for M rows and N outputs. Small batches (a decode step of <= 16 rows) are bound by
    reading the weight. One row is a GEMV: a row tile of 1, its products summed on the CUDA cores
    (tensor cores would do 16 rows of work for it), column tiles of 4, K steps of 1024
    (Qwen2.5-0.5B's 896-wide rows in one load), 8 warps and one stage: the fastest of the GEMV and
    tensor-core tiles bench/tune_decode.py timed on an H200 (bench/results/2026-11-28-h200: q/k/v
    3.57 us a call against 4.44 at K steps of 512 and 6.03 for the norm + cuBLAS; gate/up 10.09
    against 10.55 and 10.30; the tensor-core tiles 13.9 and 25.0). 2 to 16 rows take the smallest
    row tile the tensor cores take (16), K tiles of 128 and column tiles narrow enough that the
    weight spreads over ~100+ programs (q/k/v: 72 programs of 16). Larger batches take 32-64 row
    tiles and 64-wide column tiles; neither tuned on a GPU yet: bench/tune_decode.py times the
    alternatives against cuBLAS; the headline set's `fusedrl, norm + cuBLAS GEMMs` decode row is
    the whole step's comparison."""
    if rows == 1:
        return Tiles(1, 4, 1024, 8, 1)
    if rows <= 16:
        return Tiles(16, 16 if out_features <= 2048 else 32, 128)
    return Tiles(min(64, triton.next_power_of_2(rows)), 32 if rows <= 64 else 64, 64)


def launch(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
           weight: torch.Tensor, bias: Optional[torch.Tensor], glu: bool,
           tiles: Optional[Tiles] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on checked inputs (norm_linear's), at `tiles` (default: tile_shape's): (y [M, N],
    s [M, K]); s is a copy of x when residual is None. No custom op: the op's body, and what
    bench/tune_decode.py times at other tiles."""
    out, total = _norm_linear_fake(x, residual, norm_weight, eps, weight, bias, glu)
    rows, k = x.shape
    n_out = out.shape[1]
    if rows == 0:
        return out, total
    tiles = tiles or tile_shape(rows, n_out)
    grid = (triton.cdiv(rows, tiles.block_m), triton.cdiv(n_out, tiles.block_n))
    _norm_linear_kernel[grid](
        x, x if residual is None else residual, total, norm_weight, weight,
        weight if bias is None else bias, out, rows, n_out, eps, K=k,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, GLU=glu,
        INTERPRETED=not x.is_cuda, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, **tiles.options())
    return out, total


@direct_op("fusedrl::norm_linear", mutates_args=())
def _norm_linear_op(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor,
                    eps: float, weight: torch.Tensor, bias: Optional[torch.Tensor], glu: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return launch(x, residual, norm_weight, eps, weight, bias, glu)


@_norm_linear_op.register_fake
def _norm_linear_fake(x, residual, norm_weight, eps, weight, bias, glu):
    n_out = weight.shape[0] // 2 if glu else weight.shape[0]
    out = x.new_empty(x.shape[0], n_out)
    # Without a residual the stream is x itself (a fresh tensor: a custom op may not return its
    # input).
    total = torch.empty_like(x) if residual is not None else x.clone()
    return out, total


def norm_linear(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor,
                eps: float, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                glu: bool = False):
    """x, residual [M, K] (residual may be None), norm_weight [K], weight [N_W, K], bias [N_W] or
    None -> (y [M, N_W], or SiLU(gate) * up [M, N_W / 2] when glu; s = x + residual [M, K], x itself
    when residual is None). Forward only (see the module docstring)."""
    _check(x, residual, norm_weight, eps, weight, bias, glu)
    if not fused_for_model(x):
        return reference.norm_linear(x, residual, norm_weight, eps, weight, bias, glu)
    y, total = _norm_linear_op(x, residual, norm_weight, eps, weight, bias, glu)
    return y, (x if residual is None else total)


def _check(x, residual, norm_weight, eps, weight, bias, glu):
    for name, tensor in (("x", x), ("residual", residual), ("norm_weight", norm_weight),
                         ("weight", weight), ("bias", bias)):
        if tensor is not None:
            checks.check_float("norm_linear", name, tensor)
    checks.check_nonnegative("norm_linear", "eps", eps)
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"norm_linear: x must be a contiguous [M, K] tensor, got {tuple(x.shape)} "
                         f"with strides {x.stride()}")
    k = x.shape[1]
    if residual is not None and (residual.shape != x.shape or not residual.is_contiguous()):
        raise ValueError(
            f"norm_linear: residual must be contiguous {tuple(x.shape)}, got "
            f"{tuple(residual.shape)}")
    if norm_weight.shape != (k,):
        raise ValueError(f"norm_linear: norm_weight must be [{k}], got {tuple(norm_weight.shape)}")
    if weight.dim() != 2 or weight.shape[1] != k or not weight.is_contiguous():
        raise ValueError(
            f"norm_linear: weight must be a contiguous [N, {k}] tensor, got {tuple(weight.shape)}")
    if glu and weight.shape[0] % 2:
        raise ValueError(
            "norm_linear: glu needs an even number of weight rows [gate | up], got "
            f"{weight.shape[0]}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"norm_linear: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
