"""The sandbox when the trainer is a plain user: a probe trainer run as uid 65534 (setpriv) attacks
through run_python as test_sandbox_attacks.py does as root: its own 0600 file unread, its network
and memory out of reach, no descriptor of the box's pid 1 (the same uid) opened, the kernel's
surface, every socket family but unix, inet and inet6 and every kernel object no cap counts
(System V IPC, AIO, inotify, ptys) denied, /dev read-only, /dev/shm capped, each tmpfs's inodes
capped, no memory outside the caps, a fork bomb held at the process cap (counted in the sandbox's
own user namespace), nothing left after the deadline; and a bubblewrap found off the run's fixed
PATH is the one that runs (test_bwrap_path.py). Run where the suite runs as root (a plain user's
suite runs test_sandbox_attacks.py itself as that user)."""
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fusedrl.engine.sandbox.bwrap_command import SHM_INODES, SHM_MB, TMPFS_INODES
from fusedrl.engine.sandbox.runner import MAX_PROCESSES
import sandbox_testing as attack

pytestmark = pytest.mark.integration
PLAIN = attack.PLAIN
ENGINE = Path(__file__).resolve().parents[3] / "engine"
TESTING = Path(__file__).resolve().parents[1]

PROBE = r'''
import json, os, socket, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from fusedrl.engine.sandbox import detect, run_python
from fusedrl.engine.sandbox.bwrap_command import SHM_MB, TMPFS_INODES
import sandbox_kernel_testing as kernel_attack
import sandbox_testing as attack
secret, marker = sys.argv[3], f"fusedrl-plain-{os.getpid()}"  # not in our own command line
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
out = {"uid": os.getuid(), "mode": detect().kind}
run = lambda code, **kw: attack.reported(run_python(code, **kw))
out["read"] = run(attack.read_files([secret, "/etc/shadow"]))
out["network"] = run(attack.reach_network(server.getsockname()[1], secret, "x"), timeout_s=8)
out["trainer"] = run(attack.trainer_memory(os.getpid()))
out["kernel"] = run(attack.kernel_surface()) if attack.KERNEL_SURFACE and sys.argv[4] else []
out["others"] = run(attack.other_processes())
out["sockets"] = run(attack.socket_families())
out["shared"] = run(attack.unbounded_shared_memory())
out["objects"] = run(kernel_attack.kernel_objects())
out["inodes"] = run(kernel_attack.fill_inodes(["/tmp", "/sandbox", "/dev/shm"], 2 * TMPFS_INODES),
                    timeout_s=20)
out["dev"] = run(attack.fill({"/dev": 16, "/dev/shm": 4 * SHM_MB}), memory_mb=256, timeout_s=8)
out["bomb"] = run(attack.fork_bomb(marker.replace("plain", "bomb")), timeout_s=5)[0]
late = run_python(attack.outlive(marker), timeout_s=1.0)
out["late"] = late.timed_out
out["left"] = attack.left_after(marker)
os.environ["PATH"] = sys.argv[5] + os.pathsep + os.environ["PATH"]  # a bwrap off the fixed PATH
detect.cache_clear()
wrapped = run_python("print(1)")
out["wrapper"] = [detect().program, wrapped.stdout, attack.WRAPPER_MARK in wrapped.stderr]
print(json.dumps(out))
'''


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("bwrap"),
                    reason="needs root to become a plain user, setpriv and bubblewrap")
def test_a_plain_users_sandbox_holds():
    python = attack.plain_python()
    if python is None:
        pytest.skip("no interpreter uid 65534 may run")
    tmp_path = Path(tempfile.mkdtemp(prefix="fusedrl-plain-user-"))  # pytest's is root's alone
    try:
        probe(python, tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def probe(python: str, tmp_path: Path) -> None:
    package = tmp_path / "pkg" / "fusedrl"
    package.mkdir(parents=True)
    (package / "engine").symlink_to(ENGINE)
    home = tmp_path / "home"
    home.mkdir()
    secret = home / "secret.txt"
    secret.write_text("s3cret")
    for path in (home, secret):
        os.chown(path, PLAIN, PLAIN)
    secret.chmod(0o600)
    tmp_path.chmod(0o755)
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir(mode=0o755)
    wrapper = attack.bwrap_wrapper(str(wrapper_dir), shutil.which("bwrap"))
    done = subprocess.run(
        [*attack.as_plain_user(python), "-I", "-c", PROBE, str(tmp_path / "pkg"), str(TESTING),
         str(secret), "1" if platform.machine() == "x86_64" else "", str(wrapper_dir)],
        capture_output=True, text=True, timeout=120, cwd=home)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["uid"] == PLAIN and out["mode"] == "bwrap", out
    assert out["read"] == out["network"] == out["trainer"] == out["kernel"] == [], out
    assert out["others"] == out["sockets"] == out["shared"] == out["objects"] == [], out
    assert out["inodes"][0] < TMPFS_INODES and out["inodes"][1] < TMPFS_INODES, out
    assert out["inodes"][2] < SHM_INODES, out
    assert out["dev"][0] == 0 and out["dev"][1] <= SHM_MB, out
    assert out["wrapper"] == [wrapper, "1\n", True], out
    assert 0 < out["bomb"] <= MAX_PROCESSES, out
    assert out["late"] and out["left"] == [], out
