"""The expert GEMMs of a mixture-of-experts layer: slots sorted by expert (`moe_sort`), then one
grouped GEMM per projection over all experts (`grouped_linear`: torch's `F.grouped_mm` where it
reads nothing on the host, else our Triton grouped GEMM, grouped_gemm.py, or on the CPU where
grouped_mm would fail (a torch without it, its dtypes and sizes, a trace) one matmul per expert; the
choice is dispatch.grouped_gemm_path's).

Capacity-free: every expert takes the rows routed to it, however many (zero included), and the
group boundaries are device tensors, so neither op reads a value on the host: a decode step keeps
fixed shapes (T*k rows for T tokens) and stays capturable in a CUDA graph.
"""
from __future__ import annotations

import torch

from .. import checks, dispatch, reference
from ..dispatch import grouped_gemm_path, sync_checks_enabled
from .grouped_gemm import grouped_gemm


def moe_sort(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
    """expert_ids [T, k] (each token's chosen experts) -> (order [T*k] int64: the slot t*k + i of
    each row sorted by expert, tokens ascending within an expert; slot_rows [T*k] int64: the sorted
    row of each slot; offsets [num_experts] int32: the end row of each expert's group)."""
    if expert_ids.dim() != 2 or expert_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"moe_sort: expert_ids is {expert_ids.dtype} {tuple(expert_ids.shape)}: expected "
            "integer [tokens, top_k]")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"moe_sort: num_experts must be an int >= 1, got {num_experts!r}")
    if sync_checks_enabled(expert_ids):
        # An id past the experts sorts after the last group's end: its slot would be dropped.
        checks.check_values("moe_sort", "expert_ids", expert_ids,
                            (expert_ids >= 0) & (expert_ids < num_experts),
                            f"in [0, {num_experts}) (num_experts)")
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    slot_rows = torch.empty_like(order).scatter_(0, order,
                                                 torch.arange(flat.numel(), device=flat.device))
    bounds = torch.arange(num_experts, device=flat.device, dtype=flat.dtype)
    # no host read, unlike bincount
    offsets = torch.searchsorted(flat[order], bounds, right=True).to(torch.int32)
    return order, slot_rows, offsets


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's backward refuses the
    expanded or strided ones (a sum's, a transposed view's) that autograd may deliver."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [R, K] rows grouped by expert, weight [E, O, K] (one nn.Linear weight per expert),
    offsets [E] int32 (moe_sort's, offsets[-1] == R) -> [R, O], rows of group e times weight[e]^T;
    differentiable in x and weight."""
    if (x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]
        or x.dtype != weight.dtype):
        raise ValueError(f"grouped_linear: x {x.dtype} {tuple(x.shape)} and weight {weight.dtype} "
                         f"{tuple(weight.shape)} must be [R, K] and [E, O, K] of one dtype")
    for name, t in (("weight", weight), ("offsets", offsets)):
        if t.device != x.device:
            raise ValueError(f"grouped_linear: {name} is on {t.device}: expected x's device, "
                             f"{x.device}")
    if offsets.dtype != torch.int32 or offsets.shape != (weight.shape[0],):
        raise ValueError(
            f"grouped_linear: offsets is {offsets.dtype} {tuple(offsets.shape)}: expected int32 "
            f"({weight.shape[0]},)")
    if sync_checks_enabled(offsets):
        _check_offsets(offsets, x.shape[0])
    path = grouped_gemm_path(x, weight)
    if path == "triton":
        return grouped_gemm(x, weight, offsets)
    if path == "loop":
        return reference.grouped_linear(x, weight, offsets)
    if any(size * x.element_size() % 16 for size in weight.shape[1:]):
        raise ValueError(
            f"grouped_linear: weight {tuple(weight.shape)} in {x.dtype}: grouped_mm needs rows of "
            "whole 16 bytes (in and out features multiples of 16 / itemsize)")
    return _ContiguousGrad.apply(dispatch.TORCH_GROUPED_MM(x, weight.transpose(-2, -1),
                                                           offs=offsets))


def _check_offsets(offsets: torch.Tensor, rows: int) -> None:
    """offsets [E] must be group ends, non-decreasing from >= 0 to exactly R: a decrease gives a
    group a negative size, a last end short of R leaves rows in no group. Reads values (E ints)."""
    ends = offsets.tolist()
    for i, end in enumerate(ends):
        if end < (ends[i - 1] if i else 0):
            raise ValueError(
                f"grouped_linear: offsets must be non-decreasing group end rows >= 0, got "
                f"offsets[{i}]={end}" + (f" after {ends[i - 1]}" if i else ""))
    if (ends[-1] if ends else 0) != rows:
        raise ValueError(f"grouped_linear: offsets[-1] must equal x's rows R={rows} (every row in "
                         f"a group), got {ends[-1] if ends else None}")
