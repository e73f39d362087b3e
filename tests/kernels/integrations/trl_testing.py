"""TRL 1.x and Liger for the side-by-side tests: TRL 1.x cannot share the test environment with the
trl the PPO benchmark pins, so both live in their own directory (.ci/run installs them: `pip
install --target .ci-trl`), put first on sys.path of a worker process; without it the tests that
need them skip and say so."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
TRL_DIR = Path(os.environ.get("FUSEDRL_TRL_DIR", ROOT / ".ci-trl"))

needs_trl = pytest.mark.skipif(not (TRL_DIR / "trl").is_dir() or
                               not (TRL_DIR / "liger_kernel").is_dir(),
                               reason=f"TRL 1.x and Liger not installed in {TRL_DIR} (.ci/run: pip "
                                      f"install --target .ci-trl trl==1.16.0 liger-kernel==0.8.5)")


def run_worker(name: str, *args: str) -> dict:
    """The JSON line a worker script of this directory prints, run with TRL's directory first on
    its path."""
    env = {**os.environ, "PYTHONPATH": str(TRL_DIR), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name(name)), *args],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
