"""The suite as a GPU machine collects it: no TRITON_INTERPRET (tests/conftest.py sets it only
without CUDA), so a module imported at collection that sets it turns every kernel defined after
it, in every xdist worker, into an interpreted one, and tests/conftest.py stops the collection.
Under pytest-xdist the stop reached the GPU's log only as an internal error naming another test;
here CUDA is made to look available (a `sitecustomize` the child imports first) so the CPU finds
such a module before a GPU visit does. No kernel runs: only the collection."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_the_suite_collects_on_a_cuda_machine_without_switching_on_the_interpreter(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: True
    """))
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-m", "pytest", str(TESTS), "--collect-only", "-q",
                           "-p", "no:cacheprovider", "-m", "gpu and not integration"],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TRITON_INTERPRET" not in proc.stdout + proc.stderr
    # the GPU tests are selected, so the marks were read under the GPU's branch of the conftest
    assert "tests/kernels/attention/test_varlen_kernels.py::" in proc.stdout
