"""bench/gpu.sh's plan fits one visit, and a chunk of the suite cut by its timeout still
ends in its summary line (tests/tools/pytest_tally.py's per-test record)."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pytest_tally

TOOLS = Path(pytest_tally.__file__).resolve().parent
GPU_SH = TOOLS.parents[1] / "bench" / "gpu.sh"
CHUNK = """
import time, pytest
def test_a(): pass
def test_b(): pass
def test_c(): assert False
@pytest.mark.skip(reason="off")
def test_d(): pass
def test_e(): time.sleep(600)
"""


@pytest.mark.integration
def test_the_visit_is_two_calls_and_10_minutes_the_headline_set_first_taking_the_rest_of_call_1():
    """A lent GPU gives 15 minutes with its start: at most 2 calls, 10 minutes of commands; each
    call's stage limits with its setup and bundle within its minutes; every call carries the wheels,
    the calls after the build the extension it built; the build, then the headline set, the last
    stage of call 1, taking what is left of it; the GPU tests and the profile in the visit."""
    plan = subprocess.run(["bash", str(GPU_SH), "plan"], capture_output=True, text=True,
                          timeout=60)
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.strip().splitlines()
    # first: whether .whl/COMMIT (what labels the visit's results) is this tree's commit
    assert re.match(r"(prepared: |STALE: |not prepared: )", lines[0]), lines[0]
    last = re.fullmatch(r"plan: (\d+) calls, (\d+) minutes", lines[-1])
    assert last, lines[-1]
    calls = re.findall(r"^call \d+ \((\d+) min, limits (\d+) s\): (.*); carry: (.*)$", plan.stdout,
                       re.M)
    assert len(calls) == int(last[1]) <= 2
    assert sum(int(m) for m, *_ in calls) == int(last[2]) <= 10
    for i, (minutes, limits, stages, carry) in enumerate(calls):
        assert int(limits) <= 60 * int(minutes), calls[i]
        assert ".whl" in carry.split() and (i == 0 or any(c.endswith(".so") for c in carry.split()))
    order = [stage for _, _, stages, _ in calls for stage in stages.split()]
    assert order[:2] == ["build", "suite_headline"] and "tests_gpu" in order
    assert calls[0][2].split()[-1] == "suite_headline"  # the rest of call 1 is the headline's
    rest = dict(re.findall(r"^  (\w+): the rest of the call, until its deadline less the bundle: "
                           r"at least (\d+) s", plan.stdout, re.M))
    assert rest.keys() == {"suite_headline", "profile"} and int(rest["suite_headline"]) >= 300
    assert all(int(seconds) > 0 for seconds in rest.values())
    assert all(stages.split()[-1] in rest for _, _, stages, _ in calls)  # each call's last stage


@pytest.mark.integration
def test_a_chunk_killed_mid_run_still_says_how_far_it_got(tmp_path):
    (tmp_path / "test_chunk.py").write_text(CHUNK)
    tally = tmp_path / "chunk.tally"
    env = {**os.environ, pytest_tally.TALLY_ENV: str(tally), "PYTHONPATH": str(TOOLS)}
    pytest_args = ["-q", "-p", "no:cacheprovider", "-p", "pytest_tally",
                   str(tmp_path / "test_chunk.py")]
    run = subprocess.Popen([sys.executable, "-m", "pytest", *pytest_args], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    recorded = lambda: len(tally.read_text().splitlines()) if tally.exists() else 0  # noqa: E731
    while recorded() < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    run.send_signal(signal.SIGKILL)  # as timeout -k does: no summary, no report from pytest itself
    run.wait()
    line = pytest_tally.summary(str(tally), "tests_x", 12.4, 137)
    assert line == "tests_x: 2 passed, 1 failed, 1 skipped, 0 errors in 12 s, cut by its timeout"
    nothing = pytest_tally.summary(str(tmp_path / "none"), "tests_y", 3, 0)
    assert nothing.startswith("tests_y: 0 passed, 0 failed")


@pytest.mark.integration
def test_a_chunk_spread_over_xdist_workers_counts_each_test_once(tmp_path):
    (tmp_path / "test_chunk.py").write_text(CHUNK.replace("time.sleep(600)", "pass"))
    tally = tmp_path / "chunk.tally"
    env = {**os.environ, pytest_tally.TALLY_ENV: str(tally), "PYTHONPATH": str(TOOLS)}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                    "pytest_tally", "-n", "2", str(tmp_path / "test_chunk.py")], cwd=tmp_path,
                   env=env, capture_output=True, timeout=120)
    line = pytest_tally.summary(str(tally), "tests_x", 3, 1)
    assert line == "tests_x: 3 passed, 1 failed, 1 skipped, 0 errors in 3 s"
