"""Every public entry point of fusedrl.kernels.integrations called in a fresh process that imported
only fusedrl (entry_points_worker.py): none may lean on a module that something else (TRL,
transformers) happened to import first."""
import json
import subprocess
import sys
from pathlib import Path


def test_every_public_entry_point_runs_in_a_process_that_imported_only_fusedrl():
    worker = Path(__file__).with_name("entry_points_worker.py")
    done = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded_at_start"] == [], report["loaded_at_start"]
    assert report["public"] == report["called"], "a public name without a call in the worker"
    assert report["results"] == {name: "ok" for name in report["public"]}, report["results"]
