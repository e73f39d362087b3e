"""torch's own varlen flash kernel, `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10), behind
the signature of the varlen kernels: `call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k,
scale)`, causal attention of packed sequences whose queries are the last of their keys
(bottom-right aligned, as flash-attention 2 aligns them), q [Nq, H, D], k/v [Nk, Hkv, D] ->
[Nq, H, D], differentiable.

Its keyword arguments changed between releases (2.10 takes `is_causal`; later ones
`window_size=(-1, 0)`, `scale` and `enable_gqa`; without the last, GQA runs as one call per member
of the query groups, K/V as they are: `_grouped_calls`), so it is adapted from its signature and,
before its first use on a device and dtype, checked against SDPA on a small case: a torch build
whose kernel fails the check is not used (a warning says so), and the decider
(backend.attention_backend) then names the padded SDPA path.
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch

from .padded import packed_causal_attention, plan_groups


@functools.cache
def _torch_varlen_call():
    """torch's varlen_attn adapted to our call, or None when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return adapt_torch_varlen(varlen_attn)


@functools.cache
def torch_varlen_call(device: torch.device, dtype: torch.dtype):
    """torch's varlen call for this device and dtype when it passed its check there, else None."""
    call = _torch_varlen_call()
    return None if call is None else checked_varlen_call(call, device, dtype)


def checked_varlen_call(call, device, dtype):
    """call when it runs and agrees with the padded SDPA path on two sequences (GQA, one with a
    cached prefix, so the causal alignment is checked too); None with a warning otherwise."""
    seqlens_q, seqlens_k = [2, 5], [6, 5]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lens), heads, 64, generator=g).to(device, dtype)
               for lens, heads in ((seqlens_q, 4), (seqlens_k, 2), (seqlens_k, 2)))
    cu_q, cu_k = (torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=device)
                  for lens in (seqlens_q, seqlens_k))
    plan = plan_groups(seqlens_q, seqlens_k, device)
    expected = packed_causal_attention(q.float(), k.float(), v.float(), plan, 64 ** -0.5)
    try:
        out = call(q, k, v, cu_q, cu_k, max(seqlens_q), max(seqlens_k), 64 ** -0.5)
    except (RuntimeError, TypeError, ValueError) as error:
        problem = f"it raised {type(error).__name__}: {error}"
    else:
        # 2e-2: bf16 rounding of outputs of magnitude ~1; a wrong mask moves them by ~0.1-1.
        if torch.allclose(out.float(), expected, atol=2e-2):
            return call
        problem = "its output differs from SDPA's"
    warnings.warn(f"torch's varlen_attn is not used on {device} for {dtype} ({problem}); "
                  "packed and prefill attention take the padded SDPA path")
    return None


def adapt_torch_varlen(varlen_attn):
    """Wrap a `varlen_attn` of any released signature as our call; None when it cannot do causal."""
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        options = {"window_size": (-1, 0)}  # no left limit, no key to the right: causal
    elif "is_causal" in params:
        options = {"is_causal": True}
    else:
        return None
    takes_scale, takes_gqa = "scale" in params, "enable_gqa" in params

    def call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale):
        if not takes_scale and scale != q.shape[-1] ** -0.5:
            raise ValueError(f"this torch's varlen_attn has no scale argument (asked for {scale})")
        kwargs = dict(options, scale=scale) if takes_scale else dict(options)
        if k.shape[1] != q.shape[1]:
            if not takes_gqa:
                sizes = (cu_seqlens_q, cu_seqlens_k, max_q, max_k)
                return _grouped_calls(varlen_attn, q, k, v, sizes, kwargs)
            kwargs["enable_gqa"] = True
        return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, **kwargs)
    return call


def _grouped_calls(varlen_attn, q, k, v, sizes, kwargs):
    """GQA on a kernel that wants as many K/V heads as query heads (torch 2.11's varlen_attn has no
    enable_gqa): query head h reads K/V head h // G, so member j of every group (heads j, G + j,
    ...: a strided view [N, Hkv, D], rows contiguous as the flash kernels need) attends to K/V as
    they are, one call per member. K and V are not copied G times over (7x for Qwen2.5-7B: a write
    and a read of 2 x N x H x D per layer and pass, and a sum of G gradient copies in the backward);
    the calls read them G times, as the one call read their copies. -> [N, H, D]"""
    tokens, heads, dim = q.shape
    group = heads // k.shape[1]
    members = q.view(tokens, k.shape[1], group, dim)
    outs = [varlen_attn(members[:, :, j], k, v, *sizes, **kwargs) for j in range(group)]
    return torch.stack(outs, dim=2).view(tokens, heads, dim)
