"""The attention decider: which attention kernel runs for given queries. The one place that asks
whether flash-attn is installed, whether its paged calls can read the pages, and whether torch's
varlen kernel passed its check on the queries' device and dtype; the op backend underneath is
dispatch's (`model_backend`).
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch

from ..dispatch import model_backend
from .varlen import torch_varlen_call

# flash-attn 2 reads a paged KV cache only when a page holds a multiple of this many tokens.
FLASH_PAGE_MULTIPLE = 256
# The flash kernels (flash-attn's and torch's varlen entry) take head sizes that are multiples of 8,
# up to 256; torch's SDPA pads other sizes, the varlen entry refuses them ("head_size must be a
# multiple of 8"), so a model with heads of 12 takes the padded SDPA path.
FLASH_HEAD_MULTIPLE, FLASH_MAX_HEAD = 8, 256


def flash_serves(q: torch.Tensor) -> bool:
    """Whether a flash kernel can take queries ``q`` [N, H, D]: CUDA fp16/bf16, D a multiple of
    FLASH_HEAD_MULTIPLE up to FLASH_MAX_HEAD."""
    head = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and head % FLASH_HEAD_MULTIPLE == 0 and head <= FLASH_MAX_HEAD)


@functools.cache
def flash_attn():
    """The flash_attn module, or None when it is not installed."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    import flash_attn as module
    return module


def attention_backend(q: torch.Tensor, page_size: Optional[int] = None) -> str:
    """Which attention runs for queries ``q`` [N, H, D].

    page_size None (attention over the forward's own keys: a packed training batch, a prefill with
    nothing cached, a prefill's keys gathered from the pages): "flash_attn" (installed; CUDA
    fp16/bf16 and a head size flash takes: flash_serves), else "torch_varlen" (torch's varlen flash
    kernel, torch >= 2.10; the same conditions;
    only where it passed its check against SDPA on q's device and dtype, see varlen.py), else
    "torch" (padded SDPA). The varlen kernels ignore the op backend: they are the only fast path
    for a packed batch, and the padded SDPA path is their oracle.
    page_size given (reading keys from a paged cache of that many tokens a page: a decode step, a
    prefill over a cached prefix): "flash_attn" where its paged calls can read the pages (installed;
    CUDA fp16/bf16; page_size a multiple of FLASH_PAGE_MULTIPLE), else model_backend(q): "triton"
    (our fused decode kernel) or "torch" (a gather; a prefill then gathers its keys and asks again
    with page_size None).
    """
    cuda_half = flash_serves(q)
    if page_size is not None:
        if cuda_half and flash_attn() is not None and page_size % FLASH_PAGE_MULTIPLE == 0:
            return "flash_attn"
        return model_backend(q)
    if cuda_half and flash_attn() is not None:
        return "flash_attn"
    if cuda_half and torch_varlen_call(q.device, q.dtype) is not None:
        return "torch_varlen"
    return "torch"


def packed_attention_kernel(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """The kernel a packed batch's attention (training, scoring, a prefill) runs on `device` in
    `dtype` with GQA heads of 64, as a record names it: "flash_attn", "torch_varlen (GQA ...)" (how
    the groups reach it: enable_gqa, K/V as they are, or grouped calls) or "padded SDPA"."""
    backend = attention_backend(torch.empty(1, 2, 64, device=device, dtype=dtype))
    if backend == "torch_varlen":
        return f"torch_varlen (GQA {torch_varlen_call(device, dtype).gqa.replace('_', ' ')})"
    return backend if backend == "flash_attn" else "padded SDPA"
