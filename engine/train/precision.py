"""Training precision: which dtype the one weight copy has, and how it is optimized.

`bf16-mixed` (the default on CUDA): the model's parameters are bf16, the one copy the engine
generates from and the trainer differentiates; the optimizer (`FusedAdamW`,
engine/train/fused_adamw.py) keeps fp32 master weights and moments and copies each step's result
into the bf16 parameters in place. No autocast anywhere: the matmuls run in bf16 because the weights
are bf16. `fp32` (the default on the CPU): fp32 parameters, which are their own masters. Kept in
fp32 in both modes, where bf16's 8 bits of mantissa would show: the value and score heads (values
and rewards are regression outputs whose differences drive the advantages), every loss, log-prob, KL
and advantage (the kernels compute in fp32).

Bytes per trained parameter in bf16-mixed: 2 (bf16 weight) + 2 (bf16 gradient) + 4 (fp32 master)
+ 8 (fp32 AdamW moments) = 16, plus 4 transient bytes during the step (the fp32 gradients).
"""
from __future__ import annotations

from typing import get_args

import torch

from ..config.train import Precision


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> bf16-mixed on CUDA, fp32 elsewhere; the others as given."""
    if name not in get_args(Precision):
        raise ValueError(f"train.precision must be one of {get_args(Precision)}, got {name!r}")
    if name == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return name


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of the model's parameters under a resolved precision."""
    return torch.bfloat16 if precision == "bf16-mixed" else torch.float32
