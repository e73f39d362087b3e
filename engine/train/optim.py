"""AdamW with the usual no-decay groups (mixed precision when the parameters are not fp32), and the
warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math
import warnings

import torch

from ..config.train import OptimConfig
from .distributed import plain
from .precision import MixedPrecisionAdamW


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; norms and biases (1-d parameters) get no weight decay, as is standard for LMs.

    All-fp32 parameters get torch's AdamW; any bf16 parameter (train.precision=bf16-mixed) makes it
    a MixedPrecisionAdamW with fp32 master weights (engine/train/precision.py)."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if any(p.dtype != torch.float32 for p in params):
        return MixedPrecisionAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    # fused/foreach kernels are picked by torch per device; nothing here is device specific.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    Linear warmup (step + 1) / warmup_steps, so the first step already moves; then a cosine from 1
    down to min_lr_ratio, reached at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio))


def advance_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One step of the schedule, also after an update that was skipped (a non-finite loss or
    gradient, every row dropped): it keeps its place in the schedule. torch warns when the first
    schedule step comes before any optimizer step, which is what a skipped first update is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Global L2 norm of the gradients before clipping (clipping skipped when max_norm == 0); of the
    whole model when it is sharded (a collective then)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(plain(norm))
