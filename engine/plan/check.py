"""The start-up check every training stage runs (its entry point passes `startup_check` to
engine/train/run_setup.py:start_run): the parallel options' combinations
(engine/parallel/validate.py), then the memory plan of the run on its GPUs, a run that cannot fit
refused with one line before any model loads; then the options that are `auto` by the plan
resolved for this run."""
from __future__ import annotations

import dataclasses

import torch

from ..errors import UsageError
from ..model.hf_io import load_config
from ..parallel.distributed import local_world_size
from ..parallel.validate import validate
from ..train.supervised import check_context
from .memory_plan import MemoryPlan
from .planner import auto_checkpointing, plan_stage
from .report import refusal


def refuse_unfit(cfg, device: torch.device, gpus: int) -> MemoryPlan | None:
    """UsageError (exit 2) when `cfg` combines parallel options the engine does not run on `gpus`
    ranks (validate), or when its plan on `gpus` GPUs like `device` does not fit: only on CUDA,
    where the memory is known, and unless train.memory_check is off. Returns the plan it made."""
    validate(cfg.parallel_job(), gpus)
    if device.type != "cuda" or not cfg.train.memory_check:
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    plan = plan_stage(cfg, gpus, total, gpus_per_node=local_world_size())
    if not plan.fits:
        raise UsageError(refusal(plan))
    return plan


def startup_check(cfg, device: torch.device, gpus: int):
    """refuse_unfit, then `cfg` as the run runs it: train.gradient_checkpointing=auto resolved
    (planner.auto_checkpointing) to true or false."""
    plan = refuse_unfit(cfg, device, gpus)  # its plan resolved auto already: not planned twice
    on = auto_checkpointing(cfg, device, gpus, local_world_size(), plan)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                              gradient_checkpointing=on))


def supervised_startup_check(cfg, device: torch.device, gpus: int):
    """startup_check of SFT and the reward model, then data.max_length checked against the model's
    context (its config.json): a run that cannot fit is refused before any model or tokenizer
    loads and before its output_dir is taken."""
    cfg = startup_check(cfg, device, gpus)
    check_context(cfg.data, load_config(cfg.model).max_model_len)
    return cfg
