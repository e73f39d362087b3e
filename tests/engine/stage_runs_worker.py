"""The ranks' side of dist_testing.torchrun_runs: `python stage_runs_worker.py PLAN.json` under
torchrun runs the plan's steps in order on every rank, in one process group, and leaves it once at
the end.

A stage run is parsed by the `fusedrl` command's own parser and run by its stage function
(config file and overrides, run-directory checks, the stage), exactly as `fusedrl STAGE` runs it,
except the command's exit (distributed.leave: it destroys the group and ends the process), which
comes once, after the last step, and a barrier between a later run's checks and its stage. A
rank_0_call runs on rank 0 between the barriers of all ranks."""
import importlib
import json
import os
import sys
from contextlib import contextmanager

import torch.distributed as dist

import interpreter_patching
from fusedrl.engine.cli import commands
from fusedrl.engine.cli.commands import build_parser, quiet_libraries
from fusedrl.engine.parallel.distributed import leave


@contextmanager
def environment(env: dict):
    """`env` set in os.environ for the enclosed run, the earlier values restored after it."""
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def barrier() -> None:
    """Every rank here; the group joined first when no stage has joined it yet."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()


def entered_after_every_rank_checked(train):
    """The stage function `train`, entered once every rank has made the command's checks of the run
    (a run after the first: the group is up). In a launch of its own rank 0 takes the run
    directory's lock seconds after the others probed it (its imports come between); here a rank
    that checks late would find the lock held and refuse the run."""
    def stage(config):
        if dist.is_initialized():
            dist.barrier()
        return train(config)
    return stage


def run_stage(step: dict) -> None:
    args = build_parser().parse_args([step["command"], "--config", step["config"], *step["overrides"]])
    quiet_libraries(args.quiet)
    with environment(step["env"]):
        code = args.run(args)
    if code != 0:
        raise SystemExit(f"fusedrl {step['command']} --config {step['config']}: exit code {code}")


def call_on_rank_0(step: dict) -> None:
    module, name = step["call"].split(":")
    barrier()
    if int(os.environ["RANK"]) == 0:
        getattr(importlib.import_module(module), name)(*step["args"])
    barrier()


def main(plan_path: str) -> None:
    interpreter_patching.install()  # as in the suite's own processes (tests/conftest.py)
    with open(plan_path) as f:
        plan = json.load(f)
    for name, (config_cls, train, summary) in list(commands.STAGES.items()):
        commands.STAGES[name] = (config_cls, entered_after_every_rank_checked(train), summary)
    for step in plan:
        if "call" in step:
            call_on_rank_0(step)
        else:
            run_stage(step)
            barrier()  # the next run starts on every rank together, as a fresh launch would
    leave(0)


if __name__ == "__main__":
    main(sys.argv[1])
