"""The one training loop of every stage: resume, steps, log / eval / checkpoint cadence, run log,
skipped updates.

A stage supplies its loop state (a dataclass with a `step` field: optimizer steps for SFT/RM,
iterations for PPO, plus whatever position it needs to resume exactly), the parts its checkpoint
holds (engine/train/checkpoint/) and a function doing one step; `run_training` does the rest:
    remove temp leftovers of killed saves, resume from the newest checkpoint that verifies
    (train.resume; an option changed since the saved config.yaml is applied or refused:
    engine/config/resume.py; its loop state checked: loop_state.py; a data file changed since
    the run began announced: data_record.py)  ->  for each step: step(state) -> metrics, log every
    train.log_every, evaluate every eval_every, checkpoint every train.save_every steps and every
    train.save_every_minutes, and all three after the last step.
SIGTERM and SIGINT finish the current step, save a checkpoint there and stop the run with
`Interrupted` (engine/train/interrupts.py; exit 143 / 130): the same command resumes it. The
program's callbacks (RunPlan.callbacks, callbacks.py) hear of each step, train record, checkpoint
and evaluation; one that asks to stop ends the run at that step with a checkpoint, and the stage
exports its model as after the last step. A resume
says so on stderr ("resuming from step N of M"); a rerun of a run that reached its last step and
wrote its final model changes nothing (`RunComplete`), unless its length was raised.
A step that could not update (a non-finite loss or gradient, an iteration whose every row was
dropped) returns metrics with `skipped` set (and a `skip_reason`): it is counted (`skipped_steps`
in the metrics and the progress bar), announced, and train.max_consecutive_skips of them in a row
stop the run with `Diverged`.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..config.resume import resume_changes
from ..config.train import RunConfig
from ..runs.durable import remove_leftovers, sync_dir
from ..errors import FusedRLError, Interrupted, RunComplete
from ..parallel import distributed
from ..runs.run_dir import read_marker
from .callbacks import Callbacks
from .checkpoint import Trainables, latest_checkpoint, resume, save_checkpoint
from .checkpoint.store import PREFIX
from .interrupts import StopRequests
from .data_record import record_data
from .loop_state import loop_state_check
from .runlog import REPLACED_WHOLE, RunLog, SilentLog
from .trackers import tracker_names

FINAL_DIR = "final"  # RUN_DIR/final: the model every stage exports after its last step


class StopTraining(FusedRLError, RuntimeError):
    """Raised by a step to end the run early (the message is logged as an info record first)."""


class Diverged(StopTraining):
    """train.max_consecutive_skips steps in a row could not update."""


@dataclass
class RunPlan:
    """Where a run writes and how often: the stage's config (saved as config.yaml), its loop
    options (the `train` section), the number of steps and the eval cadence (0 = only at the end);
    `notices`: what the stage tells the user as the run starts (on stderr and in the run log)."""
    run_dir: str
    config: object
    options: RunConfig
    total_steps: int
    eval_every: int = 0
    notices: list = dataclasses.field(default_factory=list)
    callbacks: Sequence = ()


@dataclass
class SkipCount:
    """The loop's own resumable state: steps skipped in all and in a row (saved in each
    checkpoint)."""
    skipped_steps: int = 0
    in_a_row: int = 0

    def record(self, skipped: bool) -> None:
        self.skipped_steps += skipped
        self.in_a_row = self.in_a_row + 1 if skipped else 0


def is_due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


class SaveClock:
    """Checkpoint cadence: every `every` steps, every `minutes` of wall time, and at the last
    step."""

    def __init__(self, every: int, minutes: float, last: int):
        self.every, self.seconds, self.last = every, minutes * 60, last
        self.since = time.monotonic()

    def due(self, step: int) -> bool:
        return is_due(step, self.every, self.last) or (
            self.seconds > 0 and time.monotonic() - self.since >= self.seconds)

    def saved(self) -> None:
        self.since = time.monotonic()


def checkpoint_step(path: Path) -> int:
    """The step of checkpoint directory `path` (checkpoints/step-00000012 -> 12)."""
    return int(path.name[len(PREFIX):])


def refuse_if_complete(plan: RunPlan) -> None:
    """RunComplete when plan.run_dir already holds a checkpoint of its last step and its final
    model: a rerun changes nothing (a larger train.max_steps / iterations / epochs continues it)."""
    latest = latest_checkpoint(plan.run_dir)
    final = Path(plan.run_dir) / FINAL_DIR
    if latest is None or checkpoint_step(latest) < plan.total_steps or not final.is_dir():
        return
    raise RunComplete(f"the run in {plan.run_dir} is complete (step {checkpoint_step(latest)} of "
                      f"{plan.total_steps}, model in {final}); nothing changed (raise its number "
                      "of steps to train further)", final)


def run_training(plan: RunPlan, parts: Trainables, state, step: Callable[[object], dict], *,
                 evaluate: Optional[Callable[[], dict]] = None, info: Optional[dict] = None,
                 device: Optional[torch.device] = None):
    """Run `step(state)` until state.step reaches plan.total_steps; returns `state`.

    `step` advances the stage's own position fields (not `state.step`) and returns its metrics;
    the loop adds `step_time_s`, `skipped_steps` and, when the metrics count "tokens",
    `tokens_per_s`. Under torchrun every rank runs this loop (checkpoints and evaluation are
    collective); `step` returns metrics already reduced over the ranks (so every rank takes the same
    skip decisions), and rank 0 alone removes leftovers and writes the run log.
    Raises RunComplete before anything is written when the run had already ended, and Interrupted
    after saving a checkpoint when SIGTERM or SIGINT stopped it.
    """
    options = plan.options
    resume_from, skips, removed, notices = _start(plan, parts, state)
    run = SilentLog()
    if distributed.is_main():
        run = RunLog(plan.run_dir, plan.config, plan.total_steps, state.step, options.progress,
                     tracker_names(options), distributed.world_size())
    clock = SaveClock(options.save_every, options.save_every_minutes, plan.total_steps)
    callbacks = Callbacks(plan.callbacks, plan.config, plan.total_steps)

    def save() -> Path:
        saved = save_checkpoint(plan.run_dir, state.step, parts,
                                {**dataclasses.asdict(state), "loop": dataclasses.asdict(skips)},
                                options.keep_checkpoints)
        if distributed.is_main():
            sync_dir(saved.parent)  # its rename into place survives a power cut
        clock.saved()
        return saved

    try:
        run.log("info", state.step, {**(info or {}), "total_steps": plan.total_steps,
                                     "world_size": distributed.world_size(),
                                     "resumed_from": str(resume_from) if resume_from else None,
                                     "removed_leftovers": removed})
        for message in notices + plan.notices:
            run.notice(state.step, message)
        with StopRequests(announce=distributed.is_main()) as stops:
            while state.step < plan.total_steps:
                metrics, logged = run_step(plan, state, step, skips, run, device)
                stop = callbacks.fire("on_step", state.step, metrics)
                stop = logged and callbacks.fire("on_log", state.step, metrics) or stop
                if evaluate is not None and is_due(state.step, plan.eval_every, plan.total_steps):
                    scores = evaluate()
                    run.log("eval", state.step, scores)
                    stop = callbacks.fire("on_evaluate", state.step, scores) or stop
                signum = stops.agreed()  # every rank stops at the same step boundary, or none
                saved = save() if clock.due(state.step) or signum or stop else None
                if saved is not None:
                    stop = callbacks.fire("on_save", state.step, saved) or stop
                if signum:
                    raise interrupted(plan, state.step, signum, saved, run)
                if stop:
                    run.log("info", state.step, {"stopped": "by a callback",
                                                 "checkpoint": str(saved)})
                    break
    finally:
        run.close()
    return state


def _start(plan: RunPlan, parts: Trainables, state) -> tuple[Path | None, SkipCount, int, list]:
    """A run's start, before its log opens: an ended run refused (train.resume), the leftovers of
    a crash removed (rank 0, in a directory fusedrl made), the latest checkpoint loaded into
    `parts` and `state` (train.resume), the data files recorded. Returns (the checkpoint resumed
    from or None, the loop's skip counts, how many leftovers went, the notices of a resume: its
    step, the options and data files changed since)."""
    if plan.options.resume:
        refuse_if_complete(plan)
    removed = []
    # only in a directory fusedrl made
    if distributed.is_main() and read_marker(plan.run_dir) is not None:
        removed = (remove_leftovers(plan.run_dir, REPLACED_WHOLE)
                   + remove_leftovers(f"{plan.run_dir}/checkpoints", rf"{PREFIX}\d+"))
    distributed.barrier()  # no rank reads the run directory while rank 0 cleans it
    resuming = plan.options.resume and latest_checkpoint(plan.run_dir) is not None
    # before the checkpoint loads
    changed = resume_changes(plan.run_dir, plan.config) if resuming else {}
    check_loop = loop_state_check(state, SkipCount(), plan.total_steps)
    resume_from, loaded = (resume(plan.run_dir, parts, check_loop) if plan.options.resume
                           else (None, {}))
    skips = SkipCount(**loaded.pop("loop", {}))
    for key, value in loaded.items():
        setattr(state, key, value)
    data_files = plan.config.paths()[1] if hasattr(plan.config, "paths") else {}
    data_changes = record_data(plan.run_dir, data_files) if distributed.is_main() else []
    if resume_from is None:
        return None, skips, len(removed), []
    notices = [f"resuming from step {state.step} of {plan.total_steps} (checkpoint {resume_from})"]
    notices += [f"resumed with {key}={after!r} (was {before!r})"
                for key, (before, after) in changed.items()]
    return resume_from, skips, len(removed), notices + data_changes


class RunInterrupted(Interrupted):
    """The loop's stop by a signal. `stopped` is its message without the advice of how to go on:
    a caller whose rerun is not the same command (a demo, which starts its runs over) gives its
    own."""

    def __init__(self, stopped: str, advice: str, signum: int):
        super().__init__(f"{stopped}; {advice}", signum)
        self.stopped = stopped


def interrupted(plan: RunPlan, step: int, signum: int, saved: Path, run) -> RunInterrupted:
    """The one-line stop of a run a signal ended at `step`, checkpoint `saved` (logged first)."""
    name = signal.Signals(signum).name
    run.log("info", step, {"stopped": name, "checkpoint": str(saved)})
    how = "the same command" if plan.options.resume else "the same command with train.resume=true"
    return RunInterrupted(f"stopped by {name} at step {step} of {plan.total_steps}, checkpoint "
                          f"{saved} saved", f"{how} resumes the run from there", signum)


def run_step(plan: RunPlan, state, step: Callable[[object], dict], skips: SkipCount, run,
             device) -> tuple[dict, bool]:
    """One step of the loop: `step(state)`, its skip bookkeeping and its train record (every
    train.log_every steps, at the last and at a skipped one); Diverged after too many skips.
    Returns the step's metrics and whether they were logged."""
    options = plan.options
    start = time.perf_counter()
    try:
        metrics = step(state)
    except StopTraining as stop:
        run.log("info", state.step, {"stopped": str(stop)})
        raise
    state.step += 1
    skipped, reason = bool(metrics.pop("skipped", False)), metrics.pop("skip_reason", "")
    skips.record(skipped)
    metrics["skipped_steps"] = skips.skipped_steps
    if skipped:
        run.notice(state.step, f"step {state.step}: no update ({reason})")
    logged = is_due(state.step, options.log_every, plan.total_steps) or skipped
    if logged:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)  # honest timings: wait for the step's kernels
        elapsed = time.perf_counter() - start
        metrics["step_time_s"] = elapsed
        if "tokens" in metrics:
            metrics["tokens_per_s"] = metrics["tokens"] / elapsed
        run.log("train", state.step, metrics)
    if options.max_consecutive_skips and skips.in_a_row >= options.max_consecutive_skips:
        stop = Diverged(f"stopped at step {state.step}: {skips.in_a_row} steps in a row could not "
                        f"update (last: {reason}); the run is diverging: lower optim.lr, or raise "
                        "train.max_consecutive_skips")
        run.log("info", state.step, {"stopped": str(stop)})
        raise stop
    return metrics, logged
