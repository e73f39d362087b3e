"""torch's own varlen flash kernel, `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10), behind
the signature of the varlen kernels: `call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k,
scale)`, causal attention of packed sequences whose queries are the last of their keys
(bottom-right aligned, as flash-attention 2 aligns them), q [Nq, H, D], k/v [Nk, Hkv, D] ->
[Nq, H, D], differentiable.

Its keyword arguments changed between releases (2.10 takes `is_causal`; later ones
`window_size=(-1, 0)` and `scale`; 2.13 `enable_gqa`), so it is adapted from its signature. GQA
without `enable_gqa` has two candidates, best first: K/V passed as they are (the flash kernel
underneath takes fewer K/V heads than query heads, one call a layer; a wrapper may refuse them),
then one call per member of the query groups (`_grouped_calls`: G calls a layer, each paying the
wrapper's and autograd's host cost; 7 for Qwen2.5, whose training step the GPU profile found
host-bound). Before its first use on a device and dtype each candidate is checked against SDPA on a
small GQA case, values and gradients: the first that passes is used; when none does a warning says
why and the decider (backend.attention_backend) names the padded SDPA path.
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch

from .padded import packed_causal_attention, plan_groups


@functools.cache
def _torch_varlen_calls() -> tuple:
    """torch's varlen_attn adapted to our call, the candidates best first (none when this torch
    has no varlen_attn)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return ()
    return adapt_torch_varlen(varlen_attn)


@functools.cache
def torch_varlen_call(device: torch.device, dtype: torch.dtype):
    """torch's varlen call for this device and dtype: the first candidate that passed its check
    there, else None."""
    calls = _torch_varlen_calls()
    return checked_varlen_call(calls, device, dtype) if calls else None


def checked_varlen_call(calls, device, dtype):
    """The first of `calls` that runs and agrees with the padded SDPA path on two sequences (GQA,
    one with a cached prefix, so the causal alignment and the heads' grouping are checked too), in
    its output and in the gradients of q, k and v; None with a warning naming each one's problem
    when none does."""
    problems = []
    for call in calls:
        problem = _check_problem(call, device, dtype)
        if problem is None:
            return call
        problems.append(problem)
    warnings.warn(f"torch's varlen_attn is not used on {device} for {dtype} "
                  f"({'; '.join(problems)}); packed and prefill attention take the padded SDPA "
                  "path")
    return None


def _check_problem(call, device, dtype):
    """Why `call` fails the check (a sentence), or None when it passes."""
    seqlens_q, seqlens_k = [2, 5], [6, 5]
    # The check may come first inside a generation's inference mode: its tensors are made and
    # differentiated outside it.
    with torch.inference_mode(False), torch.enable_grad():
        plan = plan_groups(seqlens_q, seqlens_k, device)
        g = torch.Generator().manual_seed(0)
        q, k, v, upstream = (torch.randn(sum(lens), heads, 64, generator=g).to(device, dtype)
                             for lens, heads in ((seqlens_q, 4), (seqlens_k, 2), (seqlens_k, 2),
                                                 (seqlens_q, 4)))
        cu_q, cu_k = (torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=device)
                      for lens in (seqlens_q, seqlens_k))
        inputs = [x.requires_grad_() for x in (q, k, v)]
        reference = [x.detach().float().requires_grad_() for x in (q, k, v)]
        expected = packed_causal_attention(*reference, plan, 64 ** -0.5)
        expected_grads = torch.autograd.grad(expected, reference, upstream.float())
        try:
            out = call(*inputs, cu_q, cu_k, max(seqlens_q), max(seqlens_k), 64 ** -0.5)
            grads = torch.autograd.grad(out, inputs, upstream, allow_unused=True)
        except (RuntimeError, TypeError, ValueError) as error:
            return f"it raised {type(error).__name__}: {error}"
    # 2e-2: bf16 rounding of outputs of magnitude ~1; a wrong mask moves them by ~0.1-1. The
    # gradients (magnitude ~1, dk and dv summed over a group of 2): 5e-2.
    if not torch.allclose(out.float(), expected, atol=2e-2):
        return "its output differs from SDPA's"
    if not all(got is not None and torch.allclose(got.float(), want, atol=5e-2, rtol=2e-2)
               for got, want in zip(grads, expected_grads)):
        return "its gradients differ from SDPA's"
    return None


def adapt_torch_varlen(varlen_attn) -> tuple:
    """Wrap a `varlen_attn` of any released signature as our call, the candidates best first: with
    enable_gqa one; without it K/V as they are, then the grouped calls (`call.gqa` names which).
    None of them when it cannot do causal."""
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        options = {"window_size": (-1, 0)}  # no left limit, no key to the right: causal
    elif "is_causal" in params:
        options = {"is_causal": True}
    else:
        return ()
    takes_scale = "scale" in params

    def adapted(gqa):
        def call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale):
            if not takes_scale and scale != q.shape[-1] ** -0.5:
                raise ValueError(
                    f"this torch's varlen_attn has no scale argument (asked for {scale})")
            kwargs = dict(options, scale=scale) if takes_scale else dict(options)
            sizes = (cu_seqlens_q, cu_seqlens_k, max_q, max_k)
            if k.shape[1] != q.shape[1]:
                if gqa == "grouped":
                    return _grouped_calls(varlen_attn, q, k, v, sizes, kwargs)
                if gqa == "flag":
                    kwargs["enable_gqa"] = True
            return varlen_attn(q, k, v, *sizes, **kwargs)
        call.gqa = gqa
        return call

    if "enable_gqa" in params:
        return (adapted("flag"),)
    return adapted("as_they_are"), adapted("grouped")


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
