"""The memory a run holds outside its processes' address space, measured: a trainer (root, and a
plain user through setpriv) runs one program that fills each tmpfs to its size cap and then to
its inode cap and asks for System V semaphore arrays (2 MiB of kernel memory each where
allowed), in a memory cgroup of the test's own whose peak is read afterwards (as the same trainer
running `pass` gives the baseline). The rise must stay within the documented worst case
(docs/safety.md): the tmpfs' MiB, plus about 1 KiB per inode (KIB_PER_INODE allows for other
kernels), plus SLACK for the program's own pages and page tables. Root only (it makes the
cgroup and becomes the plain user); bounded (each loop capped, the run's deadline) and leaving
nothing (the run's namespaces take its mounts and IPC objects with them)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fusedrl.engine.sandbox import detect
from fusedrl.engine.sandbox.run_cgroup import RunCgroup
from fusedrl.engine.sandbox.run_mounts import MOUNTS
import sandbox_kernel_testing as kernel_attack
import sandbox_testing as attack

KIB_PER_INODE = 1.5  # measured about 1.0 (a tmpfs inode and its dentry) on Linux 6.18
SLACK_MB = 8
MEMORY_MB = 256  # the run's per-process cap: above the tmpfs' total, so a root run's cgroup
#                  (capped at memory_mb) lets the fill finish
ENGINE = Path(__file__).resolve().parents[3] / "engine"
TESTING = Path(__file__).resolve().parents[1]
TRAINER = """
import sys
sys.path[:0] = sys.argv[1:3]
from fusedrl.engine.sandbox import run_python
result = run_python(sys.argv[3], memory_mb=int(sys.argv[4]), timeout_s=20)
print(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else 'null')
"""
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0 or not detect().strong,
                                 reason="needs root (a cgroup of its own, setpriv) and bwrap")]


def peak_mb(python: list, package: str, program: str) -> tuple:
    """(what the trainer's run reported, the peak MiB of a fresh memory cgroup holding it)."""
    cgroup = RunCgroup.create(64, 4 << 30)
    if not cgroup.memory:
        cgroup.close()
        pytest.skip("no writable memory cgroup here")
    try:
        done = subprocess.run([*python, "-I", "-c", TRAINER, package, str(TESTING), program,
                               str(MEMORY_MB)], preexec_fn=cgroup.join, capture_output=True,
                              text=True, timeout=60, cwd="/")
        assert done.returncode == 0, done.stderr[-2000:]
        path = cgroup.paths["memory"]
        name = "memory.peak" if os.path.exists(f"{path}/memory.peak") else \
            "memory.max_usage_in_bytes"
        with open(os.path.join(path, name)) as peak:
            return json.loads(done.stdout.strip().splitlines()[-1]), int(peak.read()) / 2**20
    finally:
        cgroup.close()


@pytest.mark.parametrize("who", ["root", "plain user"])
def test_a_run_holds_at_most_the_documented_memory_outside_its_processes(who):
    python = [os.path.realpath(sys.executable)]
    if who == "plain user":
        plain = attack.plain_python() if shutil.which("setpriv") else None
        if plain is None:
            pytest.skip("no interpreter uid 65534 may run")
        python = attack.as_plain_user(plain)
    root = tempfile.mkdtemp(prefix="fusedrl-kernel-memory-")  # the plain user reads it
    try:
        os.chmod(root, 0o755)
        os.makedirs(os.path.join(root, "fusedrl"))
        os.symlink(ENGINE, os.path.join(root, "fusedrl", "engine"))
        sizes = {inside: size_mb for inside, size_mb, _inodes in MOUNTS.values()}
        inodes = max(count for _inside, _mb, count in MOUNTS.values())
        _none, base = peak_mb(python, root, "print('[]')")
        (written, made, arrays), held = peak_mb(
            python, root, kernel_attack.hold_everything(sizes, 2 * inodes, arrays=16))
    finally:
        shutil.rmtree(root)
    caps_mb = sum(sizes.values()) + sum(n for *_, n in MOUNTS.values()) * KIB_PER_INODE / 1024
    print(f"{who}: {held - base:.1f} MiB held (written {written} MiB, files {made}, "
          f"semaphore arrays {arrays}); documented {caps_mb:.1f} MiB")
    assert arrays == 0 and all(count <= n for count, (*_, n) in zip(made, MOUNTS.values()))
    assert held - base <= caps_mb + SLACK_MB, (held, base, written, made)
