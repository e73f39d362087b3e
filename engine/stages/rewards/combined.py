"""Several reward functions and their weights, combined as TRL combines them.

Each call scores the same rows with every function at once (each in its own worker process, or
thread), under one deadline: reward.fn_timeout_s. A row's reward is the weighted sum over the
functions that apply to it (returned a number, not None); a row no function applies to gets 0
(TRL's sum of NaNs skipped), and the caller says so. Each function's scores and the total are
summed per iteration into `rewards/NAME/mean` and `rewards/NAME/std` metrics (NAME: the function's
own name, its spec where two share one; `total`: the weighted sum).
"""
from __future__ import annotations

import math
import pickle
import time
from typing import Optional, Sequence

from ...errors import UsageError
from .functions import FunctionSource, RewardInputs, source_of
from .threads import ThreadRunner
from .workers import ProcessRunner, start_workers

TOTAL = "total"  # the metrics' name of the weighted sum


class RewardFunctions:
    """Open reward functions: `functions(inputs)` -> [F][R] scores (None: not applicable);
    close() ends their workers. Build with `open_reward_functions`."""

    def __init__(self, runners: list, names: list[str], weights: list[float], timeout_s: float,
                 pickled: bool):
        self.runners, self.names, self.weights, self.timeout_s = runners, names, weights, timeout_s
        self.pickled = pickled  # whether the runners read the batch pickled (worker processes)

    def __call__(self, inputs: RewardInputs) -> list[list[Optional[float]]]:
        """Every function's scores of `inputs`, the calls side by side; the first failure (in the
        functions' order) is raised after the other calls are abandoned."""
        payload = pickle.dumps(inputs, protocol=pickle.HIGHEST_PROTOCOL) if self.pickled else None
        deadline = time.monotonic() + self.timeout_s
        try:
            for runner in self.runners:
                runner.start(inputs, payload)
            return [runner.result(deadline) for runner in self.runners]
        except BaseException:  # a failure, or Ctrl-C: no call may answer into the next one
            for runner in self.runners:
                if runner.busy:
                    runner.abandon()
            raise

    def close(self) -> None:
        for runner in self.runners:
            runner.close()


def open_reward_functions(functions: Sequence, weights: Optional[Sequence[float]], isolation: str,
                          timeout_s: float) -> RewardFunctions:
    """Load `functions` (specs 'module:function' or callables), each contained as `isolation`
    says ('process': a worker each, started now; 'thread'), weighted by `weights` (None: 1 each)."""
    sources = [source_of(f) for f in functions]
    if weights is not None and len(weights) != len(sources):
        names = ", ".join(s.name for s in sources)
        raise UsageError(f"reward.weights has {len(weights)} weight(s) for {len(sources)} reward "
                         f"function(s) ({names}): give one per function")
    if isolation == "process":
        runners = [ProcessRunner(s, timeout_s) for s in sources]
        start_workers(runners)
    else:
        runners = [ThreadRunner(s, timeout_s) for s in sources]
    weights = [1.0] * len(sources) if weights is None else list(weights)
    return RewardFunctions(runners, metric_names(sources), weights, timeout_s,
                           pickled=isolation == "process")


def metric_names(sources: list[FunctionSource]) -> list[str]:
    """Each function's NAME in its metrics: its own name, or its full name where that is taken
    (by another function, or by `total`)."""
    short = [s.short_name for s in sources]
    return [s.name if short.count(n) > 1 or n == TOTAL else n for s, n in zip(sources, short)]


def weighted_totals(scores: list[list[Optional[float]]], weights: list[float]
                    ) -> tuple[list[float], int]:
    """[F][R] scores -> ([R] weighted sums over the functions that apply to each row, the number
    of rows no function applies to: their sum is 0)."""
    totals, unscored = [], 0
    for row in zip(*scores):
        applied = [w * s for w, s in zip(weights, row) if s is not None]
        unscored += not applied
        totals.append(sum(applied))
    return totals, unscored


def moments(names: list[str], scores: list[list[Optional[float]]], totals: list[float]) -> dict:
    """{"rewards/NAME/count|sum|sumsq": ...} over each function's finite scores and the totals'
    (sums, so ranks and sampling rounds add up: `summary` turns them into means and stds)."""
    out = {}
    for name, values in [*zip(names, scores), (TOTAL, totals)]:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        out.update({f"rewards/{name}/count": len(finite), f"rewards/{name}/sum": sum(finite),
                    f"rewards/{name}/sumsq": sum(v * v for v in finite)})
    return out


def summary(sums: dict) -> dict:
    """`moments` (summed) -> {"rewards/NAME/mean": ..., "rewards/NAME/std": ...} (NaN where a
    function applied to no row)."""
    out = {}
    for key in sums:
        if key.endswith("/count"):
            prefix, count = key[:-len("count")], sums[key]
            mean = sums[prefix + "sum"] / count if count else math.nan
            out[prefix + "mean"] = mean
            variance = sums[prefix + "sumsq"] / count - mean * mean if count else math.nan
            out[prefix + "std"] = math.sqrt(max(variance, 0.0)) if count else math.nan
    return out
