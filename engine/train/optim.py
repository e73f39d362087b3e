"""AdamW with the usual no-decay groups (fp32 masters when the parameters are not fp32), its
clipped step without a host sync, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch

from ..config.train import OptimConfig
from ..parallel import distributed
from .fused_adamw import FusedAdamW


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """FusedAdamW (engine/train/fused_adamw.py: fp32 masters for the bf16 parameters of
    train.precision=bf16-mixed); norms and biases (1-d parameters) get no weight decay, as is
    standard for LMs."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return FusedAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def parameters(optimizer: torch.optim.Optimizer) -> list:
    """Every parameter `optimizer` steps, in group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


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


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """The lr_factor schedule of the config's peak lr. Resumed (load_state_dict, after the
    optimizer's), it keeps its position from the checkpoint but its peak, warmup and length from
    the config, and sets the optimizer's lr to match: optim.lr, critic_lr and the schedule's shape
    may change on resume (engine/config/resume.py), and take effect from the first resumed step."""

    def load_state_dict(self, state_dict: dict) -> None:
        peaks = list(self.base_lrs)
        super().load_state_dict(state_dict)
        self.base_lrs = peaks
        self._last_lr = [peak * factor(self.last_epoch)
                         for peak, factor in zip(peaks, self.lr_lambdas)]
        for group, peak, lr in zip(self.optimizer.param_groups, peaks, self._last_lr):
            group.update(initial_lr=peak, lr=lr)


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int) -> WarmupCosine:
    return WarmupCosine(optimizer,
                        lambda step: lr_factor(step, cfg.warmup_steps, total_steps,
                                               cfg.min_lr_ratio))


def clip_and_step(optimizers: list[FusedAdamW], max_grad_norm: float,
                  loss: Optional[torch.Tensor] = None
                  ) -> list[torch.Tensor]:
    """Clip each optimizer's gradients to `max_grad_norm` by their global L2 norm (no clipping when
    0) and step them all, unless a norm or `loss` ([], the same on every rank) is not finite: then
    none steps. Decided on the device, no host sync. Returns each optimizer's norm before clipping
    ([] fp64); the caller reads them with its metrics (a non-finite one means the step was skipped).
    Under torchrun the gradients of unsharded parameters (LoRA) are first averaged over the
    ranks."""
    distributed.average_replicated_gradients(optimizers)
    grads = [o.gradients() for o in optimizers]
    norms = [g.norm for g in grads]
    # A sum is finite iff its terms are (short of an overflow, which should skip too), and x * 0 is
    # 0 for a finite x and NaN otherwise: found_inf (1.0 skips, fp32 as the fused kernel reads it)
    # in three kernels (isfinite is four by itself).
    # With train.optimizer_offload the norms are on the CPU (FSDP2 offloads the gradients) and the
    # loss on the GPU: the decision is taken on the first norm's device, one copy of each other term
    # (a host read only then, and the CPU step waits for the offloaded gradients anyway).
    device = norms[0].device
    checked = functools.reduce(torch.add,
                               [t.to(device) for t in (norms if loss is None else [*norms, loss])])
    found_inf = torch.empty((), dtype=torch.float32, device=device)
    torch.mul(checked, 0.0, out=found_inf).nan_to_num_(nan=1.0)
    for optimizer, g in zip(optimizers, grads):
        # The clip divisor max(norm / max_grad_norm, 1), applied in fp32 by the fused AdamW kernel.
        scale = None
        if max_grad_norm > 0:
            scale = torch.empty((), dtype=torch.float32, device=g.norm.device)
            torch.div(g.norm, max_grad_norm, out=scale).clamp_(min=1.0)
        optimizer.step(gradients=g, grad_scale=scale, found_inf=found_inf.to(g.norm.device))
    return norms


def advance_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One step of the schedule, also after an update that was skipped (a non-finite loss or
    gradient, every row dropped): it keeps its place in the schedule. torch warns when the first
    schedule step comes before any optimizer step, which is what a skipped first update is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore",
                                message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()

