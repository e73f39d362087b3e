"""Argument checks shared by the ops' host functions. Host functions check; kernels trust.

Every error names the op, the argument, what it got and what was expected. None of these read
tensor values (no host sync), except ``check_label_range`` and ``check_values`` which callers gate
on ``dispatch.sync_checks_enabled``.
"""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(op: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_dtype(op: str, name: str, x: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    check_tensor(op, name, x)
    if x.dtype not in allowed:
        raise TypeError(f"{op}: {name} must have dtype in ({_names(allowed)}), got {x.dtype}")


def check_float(op: str, name: str, x: torch.Tensor) -> None:
    check_dtype(op, name, x, FLOAT_DTYPES)


def check_same_shape(op: str, name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``x`` must have exactly ``ref``'s shape (no broadcasting) and live on its device."""
    check_tensor(op, name, x)
    if x.shape != ref.shape:
        raise ValueError(
            f"{op}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, got "
            f"{tuple(x.shape)}"
        )
    if x.device != ref.device:
        raise ValueError(f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}")


def check_mask(op: str, mask: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """A mask is bool or integer (nonzero = valid) with exactly ``ref``'s shape (mask_arg takes
    float masks too)."""
    check_tensor(op, "mask", mask)
    if mask.dtype not in MASK_DTYPES:
        raise TypeError(
            f"{op}: mask must be bool, integer or float (nonzero = valid), got {mask.dtype}"
        )
    check_same_shape(op, "mask", mask, ref_name, ref)


def mask_arg(op: str, mask, ref_name: str, ref: torch.Tensor, *, optional: bool = True):
    """A host's mask as the ops take it: bool or integer as given, a float mask (TRL's
    completion_mask, nonzero = valid) as bool; checked as check_mask. None passes where
    ``optional``."""
    if mask is None and not optional:
        check_tensor(op, "mask", mask)
    if isinstance(mask, torch.Tensor) and mask.dtype.is_floating_point:
        check_same_shape(op, "mask", mask, ref_name, ref)
        return mask != 0
    if mask is not None:
        check_mask(op, mask, ref_name, ref)
    return mask


def check_choice(op: str, name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{op}: unknown {name} {value!r}; expected one of {tuple(choices)}")


def check_positive(op: str, name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{op}: {name} must be a positive number, got {value!r}")


def check_nonnegative(op: str, name: str, value: float) -> None:
    """A finite number >= 0 (an eps: a negative one can take a square root below 0, NaN reaches
    every output)."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
        or not 0.0 <= value < float("inf")):
        raise ValueError(f"{op}: {name} must be a finite number >= 0, got {value!r}")


def check_last_dim(op: str, name: str, x: torch.Tensor) -> None:
    """x is [..., C] with C >= 1 (a reduction over an empty last dim has no value)."""
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{op}: {name} must have shape [..., C] with C >= 1, got {tuple(x.shape)}")


def check_unit_interval(op: str, name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{op}: {name} must be a number in [0, 1], got {value!r}")


def check_label_range(op: str, labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Every label is in [0, vocab_size) or equals ignore_index. Reads values: a sync on GPU."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"{op}: labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"got {int(bad.sum())} out of range (first: {first})"
        )


def check_values(op: str, name: str, x: torch.Tensor, ok: torch.Tensor, expected: str) -> None:
    """Every entry of x where ``ok`` (bool, x's shape) holds, else a ValueError saying what each
    must be (``expected``), how many are not and the first. Reads values: a sync on GPU."""
    bad = ~ok
    if bool(bad.any()):
        first = x[bad][0].item()
        raise ValueError(
            f"{op}: {name} must be {expected}; got {int(bad.sum())} out of range (first: {first})")


def check_kv_store(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, op: str = "store_kv") -> None:
    """k, v [N, Hkv, D] (heads and head dims contiguous) into contiguous caches [blocks, page, Hkv,
    D] of their dtype, all on one device, at slot_mapping [N] int64."""
    if k.shape != v.shape or k.shape[1:] != k_cache.shape[2:] or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{op}: k {tuple(k.shape)}, v {tuple(v.shape)} do not fit caches "
            f"{tuple(k_cache.shape)}")
    # The kernel would store with a silent cast, the reference's index_put refuses.
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != k.dtype:
            raise TypeError(f"{op}: {name} is {t.dtype} but k is {k.dtype}: expected one dtype")
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("slot_mapping", slot_mapping)):
        if t.device != k.device:
            raise ValueError(f"{op}: {name} is on {t.device} but k is on {k.device}")
    if k.stride()[1:] != (k.shape[2], 1) or v.stride()[1:] != (v.shape[2], 1):
        raise ValueError(f"{op}: k and v must have contiguous heads and head dims")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"{op}: k_cache and v_cache must be contiguous")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"{op}: slot_mapping must be int64 [{k.shape[0]}], got "
                         f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")


def check_slot_range(op: str, slot_mapping: torch.Tensor, k_cache: torch.Tensor) -> None:
    """Every slot is -1 (a padding row, skipped) or one of the cache's blocks * page slots. Reads
    values: a sync on GPU."""
    slots = k_cache.shape[0] * k_cache.shape[1]
    check_values(op, "slot_mapping", slot_mapping,
                 (slot_mapping == -1) | ((slot_mapping >= 0) & (slot_mapping < slots)),
                 f"-1 (skip) or in [0, {slots}) (blocks x page)")


def check_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
    """q [B, H, D] (head dim contiguous) over contiguous caches [blocks, page, Hkv, D] with H a
    multiple of Hkv; block_tables [B, max_blocks] and context_lens [B] int32."""
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if q.stride(2) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q's head dim and the caches must be contiguous")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if block_tables.shape[0] != q.shape[0] or context_lens.shape != (q.shape[0],):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} / context_lens "
                         f"{tuple(context_lens.shape)} do not match batch {q.shape[0]}")
