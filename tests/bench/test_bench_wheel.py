"""The built wheel holds fusedrl.bench and the package's data files (and none of the repository's
tools), and `fusedrl bench --help` runs from the wheel's own files. Built from a copy of the
sources, so the checkout gets no build/ folder."""
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("setup.py", "pyproject.toml", "README.md", "kernels", "engine", "bench", "csrc")


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("wheel") is None
                    or importlib.util.find_spec("setuptools") is None,
                    reason="building without isolation needs setuptools and wheel (the test extra)")
def test_the_wheel_holds_fusedrl_bench_and_its_command_runs_from_it(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns(
            "__pycache__", "results", "*.so")} if (ROOT / name).is_dir() else {}))
    env = {**os.environ, "FUSEDRL_SKIP_CUDA_BUILD": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(src), "-w", str(tmp_path / "dist")], check=True, env=env,
                   capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("fusedrl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("__init__", "command", "runner", "results", "devices", "shapes", "harness",
                   "suites/kernels", "suites/generate", "suites/train", "suites/rl"):
        assert f"fusedrl/bench/{module}.py" in names, module
    assert not any("static_gpu" in n or "pytest_tally" in n or "gpucheck" in n for n in names)
    # the data files the package reads: the config presets, the launches `fusedrl demo` compiles
    assert "fusedrl/engine/demos/demo_launches.json" in names
    assert any(n.startswith("fusedrl/engine/config/presets/") for n in names)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    code = (f"import sys; sys.path.insert(0, {str(site)!r})\n"
            "import fusedrl.bench, fusedrl.engine.cli as cli\n"
            f"assert fusedrl.bench.__file__.startswith({str(site)!r}), fusedrl.bench.__file__\n"
            "cli.main(['bench', '--help'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "{headline,kernels,generate,train,rl,all,compare}" in done.stdout
