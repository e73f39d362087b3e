"""A chunk of the suite's outcome, written test by test, so a run cut by its timeout still says how
far it got (a pytest killed mid-run prints no summary and writes no JUnit report).

As a pytest plugin (`-p pytest_tally`, bench/ on PYTHONPATH, FUSEDRL_TALLY=FILE): one line `OUTCOME
WHEN NODEID` appended and flushed per test phase report (under xdist, the controller's reports:
every worker's tests). As a command, the chunk's one summary line from that file:

    python tests/tools/pytest_tally.py FILE NAME SECONDS EXIT_CODE
    -> NAME: P passed, F failed, S skipped, E errors in SECONDS s[, cut by its timeout]
"""
from __future__ import annotations

import os
import sys
from collections import Counter

TALLY_ENV = "FUSEDRL_TALLY"
# timeout(1)'s exit codes for a command it stopped (SIGINT sent, or SIGKILL after -k).
CUT_CODES = (124, 137)


def pytest_configure(config) -> None:
    """Registers the writer, except in an xdist worker (config.workerinput: the controller writes
    every worker's reports, and a worker's own would count each test twice). The worker is read
    from the config, not from PYTEST_XDIST_WORKER, which a pytest started by a test inherits."""
    path = os.environ.get(TALLY_ENV)
    if path and not hasattr(config, "workerinput"):
        config.pluginmanager.register(TallyWriter(path), "fusedrl_tally_writer")


class TallyWriter:
    """Appends one line `OUTCOME WHEN NODEID` per test phase report to `path`."""

    def __init__(self, path: str):
        self.path = path

    def pytest_runtest_logreport(self, report) -> None:
        if report.passed and report.when != "call":  # a passed setup or teardown says nothing
            return
        with open(self.path, "a") as f:
            f.write(f"{report.outcome} {report.when} {report.nodeid}\n")


def tally(lines) -> Counter:
    """Counts of passed / failed / skipped / errors from the plugin's lines, as pytest counts them:
    a test passes by its call; a failed call fails it; a failed setup or teardown is an error; a
    skip at any phase skips it."""
    counts = Counter(passed=0, failed=0, skipped=0, errors=0)
    for line in lines:
        outcome, when, _ = line.split(" ", 2)
        if outcome == "skipped":
            counts["skipped"] += 1
        elif outcome == "failed":
            counts["failed" if when == "call" else "errors"] += 1
        elif when == "call":
            counts["passed"] += 1
    return counts


def summary(path: str, name: str, seconds: float, code: int) -> str:
    try:
        with open(path) as f:
            counts = tally(f.read().splitlines())
    except FileNotFoundError:
        counts = tally([])
    cut = ", cut by its timeout" if code in CUT_CODES else ""
    counted = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "skipped", "errors"))
    return f"{name}: {counted} in {seconds:.0f} s{cut}"


if __name__ == "__main__":
    print(summary(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])))
