"""The start-up check every training stage runs (engine/train/run_setup.py:start_run): the memory
plan of the run on its GPUs, a run that cannot fit refused with one line before any model loads."""
from __future__ import annotations

import torch

from ..config.train import RMConfig, SFTConfig
from ..errors import UsageError
from .planner import plan_stage
from .report import refusal


def refuse_unfit(cfg, device: torch.device, gpus: int) -> None:
    """UsageError (exit 2) when `cfg`'s plan on `gpus` GPUs like `device` does not fit. Only on CUDA,
    where the memory is known, and unless train.memory_check is off; also refuses
    train.optimizer_offload and train.tensor_parallel > 1, which only the plan knows so far."""
    if cfg.train.optimizer_offload:
        raise UsageError("train.optimizer_offload=true: not implemented yet in training "
                         "(`fusedrl plan` accounts for it)")
    if cfg.train.tensor_parallel > 1 and (not isinstance(cfg, (SFTConfig, RMConfig)) or cfg.lora.rank > 0):
        raise UsageError(f"train.tensor_parallel={cfg.train.tensor_parallel}: only full SFT and RM train "
                         "tensor-parallel yet (`fusedrl generate --tensor-parallel T` generates; `fusedrl plan` "
                         "accounts for it)")
    if device.type != "cuda" or not cfg.train.memory_check:
        return
    total = torch.cuda.get_device_properties(device).total_memory
    plan = plan_stage(cfg, gpus, total)
    if not plan.fits:
        raise UsageError(refusal(plan))
