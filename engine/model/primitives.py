"""The primitive sets the decoder is walked with (`CausalLM.hidden_states`): one walk of the layers,
its ops taken from a set chosen by the caller.

- `FUSED` (CUDA, and CPU tensors where kernels' backend override asks for Triton under
  TRITON_INTERPRET=1): torch's GEMMs and our fused kernels (add + RMSNorm, RoPE of q and k in one
  launch, SiLU * up on the packed gate/up output), each with its backward, the same for decode,
  scoring and training.
- `EAGER` (the CPU): the eager compositions transformers runs, op for op, which keeps the fp32 parity
  with transformers tight.

The batch-invariant mode (`invariant/primitives.py`) adds its own sets with the same fields plus its
attention and log-softmax. Every field keeps its meaning across the sets:
  linear(x [N, K], weight [O, K], bias [O] or None) -> [N, O]
  add_rms_norm(x, residual or None, weight, eps) -> (RMSNorm(x + residual), x + residual)
  rope(q [N, H, D], k [N, Hkv, D], cos [N, D], sin [N, D]) -> rotated (q, k)
  silu_mul(gate_up [N, 2C]) -> SiLU(gate) * up [N, C]
  norm_linear(x, residual or None, norm: RMSNorm, proj: Projection, prims, glu=False) ->
      (proj(RMSNorm(x + residual)), x + residual), the projection's output passed through silu_mul
      when glu; prims: the walk's set (what norm and proj are called with, as every module is)

`norm_linear` is the composition of the walk's other fields in every set but `DECODE`, where it is
one kernel (kernels/norm_linear.py) whenever it can be: no autograd, and nothing hooked on the
projection (LoRA's adapters read the normalized input, which the fused kernel never writes).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ...kernels import reference
from ...kernels.dispatch import fused_for_model
from ...kernels.norm import rms_norm
from ...kernels.norm_linear import norm_linear as fused_norm_linear
from ...kernels.rotary import rope
from ...kernels.swiglu import silu_mul


def fused_add_rms_norm(x, residual, weight, eps):
    """The fused kernel's (norm, sum) pair, also before the first layer (residual None: sum = x)."""
    if residual is None:
        return rms_norm(x, weight, eps), x
    return rms_norm(x, weight, eps, residual)


def _eager_add_rms_norm(x, residual, weight, eps):
    if residual is None:
        return reference.rms_norm(x, weight, eps), x
    return reference.rms_norm(x, weight, eps, residual)


def composed_norm_linear(x, residual, norm, proj, prims: SimpleNamespace, glu: bool = False):
    """`norm_linear` as the walk's own norm, projection and SiLU * up, one after the other."""
    h, residual = norm(x, residual, prims)
    y = proj(h, prims)
    return (prims.silu_mul(y) if glu else y), residual


def _decode_norm_linear(x, residual, norm, proj, prims: SimpleNamespace, glu: bool = False):
    hooked = proj._forward_hooks or proj._forward_pre_hooks
    if hooked or torch.is_grad_enabled():
        return composed_norm_linear(x, residual, norm, proj, prims, glu)
    return fused_norm_linear(x, residual, norm.weight, norm.eps, proj.weight, proj.bias, glu)


FUSED = SimpleNamespace(linear=F.linear, add_rms_norm=fused_add_rms_norm, rope=rope, silu_mul=silu_mul,
                        norm_linear=composed_norm_linear)

# A decode step's set: FUSED, with each norm and the projection after it as one kernel.
DECODE = SimpleNamespace(**{**vars(FUSED), "norm_linear": _decode_norm_linear})

EAGER = SimpleNamespace(
    linear=F.linear,
    add_rms_norm=_eager_add_rms_norm,
    rope=reference.rope,
    silu_mul=reference.silu_mul,
    norm_linear=composed_norm_linear,
)


def primitives_for(x: torch.Tensor) -> SimpleNamespace:
    """The default set for tensors like `x`: FUSED where the engine runs its Triton kernels, else EAGER."""
    return FUSED if fused_for_model(x) else EAGER


def decode_primitives_for(x: torch.Tensor) -> SimpleNamespace:
    """A decode step's set for tensors like `x`: DECODE where the engine runs its Triton kernels, else EAGER."""
    return DECODE if fused_for_model(x) else EAGER
