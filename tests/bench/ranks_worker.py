"""Run by test_bench_torchrun.py under torchrun (2 gloo ranks): what the ranks of a `fusedrl
bench` run must agree on, checked on each rank; exits non-zero on a rank where a check fails."""
import os
import sys
import tempfile
import time
from pathlib import Path

from fusedrl.bench import ranks
from fusedrl.bench.options import BenchOptions
from fusedrl.bench.runner import Clock


def fail_on_rank_0():
    if ranks.rank() == 0:
        raise OSError("disk full")
    raise AssertionError("make() ran on a rank other than 0")


def main(out: str) -> None:
    ranks.start("cpu")
    made = ranks.made_once(lambda: tempfile.mkdtemp(dir=out, prefix=f"made_by_{ranks.rank()}_"))
    assert Path(made).name.startswith("made_by_0_"), made  # rank 0's directory on every rank
    try:
        ranks.made_once(fail_on_rank_0)
        raise AssertionError("made_once returned after rank 0 failed")
    except OSError as error:  # rank 0: its own error
        assert ranks.rank() == 0 and str(error) == "disk full", error
    except RuntimeError as error:  # the others: rank 0's, named
        assert ranks.rank() == 1 and str(error) == "on rank 0: OSError: disk full", error
    clock = Clock(BenchOptions(max_minutes=1.0, row_seconds=5.0))
    assert clock.limit()[0] is None  # no timer stops a case under torchrun
    assert not clock.past_deadline()
    if ranks.rank() == 1:  # rank 1's deadline passed, rank 0's not: both skip what follows
        clock.start = time.monotonic() - 61
    assert clock.past_deadline()
    assert ranks.agreed_count(3 + ranks.rank()) == 3
    ranks.stop()


if __name__ == "__main__":
    main(sys.argv[1])
    print(f"rank {os.environ['RANK']} ok")
