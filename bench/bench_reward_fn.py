"""Overhead of one reward-function call in a worker process (reward.isolation=process) against
the same call in a thread of the trainer (reward.isolation=thread) and a plain call: a batch of
256 short rows (a prompt of ~40 characters, a response of ~60, 16 token ids, one `solution`
column) scored by a function that does almost nothing, so the time is the containment's. On the
CPU; the bar is 10 ms per call in a worker.

    python bench/bench_reward_fn.py [--rows 256] [--calls 200]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from fusedrl.engine.stages.rewards.combined import open_reward_functions
from fusedrl.engine.stages.rewards.functions import RewardInputs

USER_MODULE = '''
def exact(prompts, completions, solution, **kwargs):
    return [float(c == s) for c, s in zip(completions, solution)]
'''


def batch(rows: int) -> RewardInputs:
    """`rows` short rows, distinct strings (no pickling memo across rows)."""
    prompts = [f"Question {i}: what is {i} plus {i + 1}? Answer briefly." for i in range(rows)]
    responses = [f"The sum of {i} and {i + 1} is {2 * i + 1}, as adding them shows."
                 for i in range(rows)]
    return RewardInputs(prompts, prompts, responses, [list(range(i, i + 16)) for i in range(rows)],
                        {"solution": [str(2 * i + 1) for i in range(rows)]})


def ms_per_call(score, inputs: RewardInputs, calls: int) -> tuple[float, float]:
    """(median, 90th percentile) milliseconds of score(inputs), after a warm-up."""
    for _ in range(10):
        score(inputs)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        score(inputs)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[int(0.9 * len(times))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    inputs = batch(args.rows)
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, "bench_rewards.py"), "w") as f:
            f.write(USER_MODULE)
        os.chdir(directory)
        sys.path.insert(0, directory)
        from bench_rewards import exact
        results = {"plain call": ms_per_call(lambda x: exact(**x.keywords()), inputs, args.calls)}
        for isolation in ("thread", "process"):
            functions = open_reward_functions(["bench_rewards:exact"], None, isolation, 60.0)
            try:
                results[isolation] = ms_per_call(functions, inputs, args.calls)
            finally:
                functions.close()
    print(f"{args.rows} rows per call, {args.calls} calls (CPU)")
    for name, (median, p90) in results.items():
        print(f"  {name:<11} median {median:7.3f} ms   p90 {p90:7.3f} ms")
    over = results["process"][0] - results["plain call"][0]
    print(f"worker overhead per call: {over:.3f} ms (bar: 10 ms)")
    return 0 if over < 10 else 1


if __name__ == "__main__":
    sys.exit(main())
