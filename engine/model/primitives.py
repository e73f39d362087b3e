"""The three primitive sets the decoder is walked with (`CausalLM.hidden_states`): one walk of the
layers, its ops taken from the set the caller chooses by purpose.

- `FORWARD`: training and scoring (and a prefill step): torch's GEMMs and fusedrl.kernels' add +
  RMSNorm, RoPE of q and k in one launch and SiLU * up on the packed gate/up output, each with its
  backward.
- `DECODE`: a decode step: `FORWARD` with each norm and the projection after it as one kernel
  (`norm_linear`) whenever it can be: no autograd, nothing hooked on the projection (LoRA's
  adapters read the normalized input, which the fused kernel never writes), and at most
  FUSED_NORM_LINEAR_ROWS rows (more take cuBLAS's GEMMs).
- `EXACT`: the batch-invariant mode (`invariant.BatchInvariant`): fusedrl.kernels.exact's ops, each
  row's result independent of the batch, plus its attention and log-softmax.

Which implementation runs is not a set of its own: every op asks fusedrl.kernels' decider, and the
walk runs all its ops on one model backend (`kernels.model_backend`): "triton" on CUDA, "torch" on
the CPU, where the ops fall back to their references, the eager compositions transformers runs op
for op (which keeps the fp32 parity with transformers tight). Every field means the same in every
set:
  linear(x [N, K], weight [O, K], bias [O] or None) -> [N, O]
  add_rms_norm(x, residual or None, weight, eps) -> (RMSNorm(x + residual), x + residual)
  rope(q [N, H, D], k [N, Hkv, D], cos [N, D], sin [N, D]) -> rotated (q, k)
  silu_mul(gate_up [N, 2C]) -> SiLU(gate) * up [N, C]
  norm_linear(x, residual or None, norm: RMSNorm, proj: Projection, prims, glu=False) ->
      (proj(RMSNorm(x + residual)), x + residual), the projection's output passed through silu_mul
      when glu; prims: the walk's set (what norm and proj are called with, as every module is)
  embed(embedding: nn.Embedding, input_ids [N]) -> [N, hidden]
  enter(layer, *args) -> the layer's output: how the walk calls a decoder layer (through its hooks,
      where FSDP gathers its parameters; `past_hooks(prims)` calls its forward on the parameters it
      holds: the persistent gathered buffers)
`EXACT` adds
  attention(q, k_rows, v_rows, positions, seq_index, page_table, page, segment, max_position) -> [N,
  H, D] row_logprobs(logits [R, V] fp32, tokens [R], temperatures [R]) -> (logp [R], entropy [R])
and its linear takes out_dtype (the LM head's fp32 logits).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ... import kernels
from ...kernels import exact


def add_rms_norm(x, residual, weight, eps):
    """The norm kernel's (norm, sum) pair, also before the first layer (residual None: sum = x)."""
    if residual is None:
        return kernels.rms_norm(x, weight, eps), x
    return kernels.rms_norm(x, weight, eps, residual)


def composed_norm_linear(x, residual, norm, proj, prims: SimpleNamespace, glu: bool = False):
    """`norm_linear` as the walk's own norm, projection and SiLU * up, one after the other."""
    h, residual = norm(x, residual, prims)
    y = proj(h, prims)
    return (prims.silu_mul(y) if glu else y), residual


# Rows up to which a decode step's norm and projection are one kernel; more rows run the norm
# kernel, cuBLAS's GEMM and SiLU * up. At 256 rows the fused kernel took 53% of an H200's decode
# step, 40 us a call (bench/results/2026-11-28-h200: profile_decode_b256.txt), where the same
# profile's cuBLAS GEMMs of o's and down's shapes at 256 rows took 5-10 us; one row is a GEMV,
# which beat the norm kernel + cuBLAS there (tune_decode.md). tune_decode's batch-256 rows time
# both sides.
FUSED_NORM_LINEAR_ROWS = 16


def _decode_norm_linear(x, residual, norm, proj, prims: SimpleNamespace, glu: bool = False):
    hooked = proj._forward_hooks or proj._forward_pre_hooks
    if hooked or torch.is_grad_enabled() or x.shape[0] > FUSED_NORM_LINEAR_ROWS:
        return composed_norm_linear(x, residual, norm, proj, prims, glu)
    return kernels.norm_linear(x, residual, norm.weight, norm.eps, proj.weight, proj.bias, glu)


def embed(embedding, input_ids):
    return embedding(input_ids)


def enter(layer, *args):
    return layer(*args)


def enter_past_hooks(layer, *args):
    """A layer's forward on the parameters it holds now, past its hooks (FSDP's, which would
    all-gather them): how the walk runs on weights that stay put (the persistent gathered
    buffers)."""
    return layer.forward(*args)


def past_hooks(prims: SimpleNamespace) -> SimpleNamespace:
    """`prims` with each layer entered past its hooks (enter_past_hooks)."""
    return SimpleNamespace(**{**vars(prims), "enter": enter_past_hooks})


FORWARD = SimpleNamespace(linear=F.linear, add_rms_norm=add_rms_norm, rope=kernels.rope,
                          silu_mul=kernels.silu_mul, norm_linear=composed_norm_linear, embed=embed,
                          enter=enter)

DECODE = SimpleNamespace(**{**vars(FORWARD), "norm_linear": _decode_norm_linear})

EXACT = SimpleNamespace(linear=exact.linear, add_rms_norm=exact.add_rms_norm, rope=exact.rope,
                        silu_mul=exact.silu_mul, norm_linear=composed_norm_linear, embed=embed,
                        enter=enter, attention=exact.attention,
                        row_logprobs=exact.row_logprobs)
