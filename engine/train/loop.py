"""The one training loop of every stage: resume, steps, log / eval / checkpoint cadence, run log.

A stage supplies its loop state (a dataclass with a `step` field: optimizer steps for SFT/RM,
iterations for PPO, plus whatever position it needs to resume exactly), the parts its checkpoint
holds (engine/train/checkpoint.py) and a function doing one step; `run_training` does the rest:
    resume from the newest checkpoint (train.resume)  ->  for each step: step(state) -> metrics,
    log every train.log_every, evaluate every eval_every, checkpoint every train.save_every,
    and all three after the last step.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config.train import RunConfig
from . import distributed
from .checkpoint import Trainables, latest_checkpoint, load_checkpoint, save_checkpoint
from .runlog import RunLog, SilentLog


class StopTraining(RuntimeError):
    """Raised by a step to end the run early (the message is logged as an info record first)."""


@dataclass
class RunPlan:
    """Where a run writes and how often: the stage's config (saved as config.yaml), its loop
    options (the `train` section), the number of steps and the eval cadence (0 = only at the end)."""
    run_dir: str
    config: object
    options: RunConfig
    total_steps: int
    eval_every: int = 0


def is_due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def run_training(plan: RunPlan, parts: Trainables, state, step: Callable[[object], dict], *,
                 evaluate: Optional[Callable[[], dict]] = None, info: Optional[dict] = None,
                 device: Optional[torch.device] = None):
    """Run `step(state)` until state.step reaches plan.total_steps; returns `state`.

    `step` advances the stage's own position fields (not `state.step`) and returns its metrics;
    the loop adds `step_time_s` and, when the metrics count "tokens", `tokens_per_s`.
    Under torchrun every rank runs this loop (checkpoints and evaluation are collective); `step`
    returns metrics already reduced over the ranks, and rank 0 alone writes the run log.
    """
    options = plan.options
    resume_from = latest_checkpoint(plan.run_dir) if options.resume else None
    if resume_from is not None:
        for key, value in load_checkpoint(resume_from, parts).items():
            setattr(state, key, value)
    run = (RunLog(plan.run_dir, plan.config, plan.total_steps, state.step, options.progress, options.tensorboard,
                  distributed.world_size()) if distributed.is_main() else SilentLog())
    try:
        run.log("info", state.step, {**(info or {}), "total_steps": plan.total_steps,
                                     "world_size": distributed.world_size(),
                                     "resumed_from": str(resume_from) if resume_from else None})
        while state.step < plan.total_steps:
            start = time.perf_counter()
            try:
                metrics = step(state)
            except StopTraining as stop:
                run.log("info", state.step, {"stopped": str(stop)})
                raise
            state.step += 1
            if is_due(state.step, options.log_every, plan.total_steps):
                if device is not None and device.type == "cuda":
                    torch.cuda.synchronize(device)  # honest timings: wait for the step's kernels
                elapsed = time.perf_counter() - start
                metrics["step_time_s"] = elapsed
                if "tokens" in metrics:
                    metrics["tokens_per_s"] = metrics["tokens"] / elapsed
                run.log("train", state.step, metrics)
            if evaluate is not None and is_due(state.step, plan.eval_every, plan.total_steps):
                run.log("eval", state.step, evaluate())
            if is_due(state.step, options.save_every, plan.total_steps):
                save_checkpoint(plan.run_dir, state.step, parts, dataclasses.asdict(state),
                                options.keep_checkpoints)
    finally:
        run.close()
    return state
