"""The model's code as an attacker, through run_python in the strong sandbox (bubblewrap): no file
outside its work directory read or written, no network, no way to the trainer's memory or to any
descriptor of a process not its own, the kernel's attack surface, every socket family but unix,
inet and inet6, and every kernel object no cap counts (System V IPC, POSIX message queues, AIO,
inotify, fanotify, ptys) denied, processes, memory, the tmpfs' sizes and inodes capped for the
whole run, /dev read-only, nothing left after its deadline; and, where no strong sandbox works,
its code refused unless asked for."""
import glob
import os
import platform
import socket
import sysconfig
import tempfile
import time

import pytest

from fusedrl.engine.sandbox import detect, run_python
from fusedrl.engine.sandbox.bwrap_command import SHM_INODES, SHM_MB, TMPFS_INODES, TMPFS_MB
from fusedrl.engine.sandbox.run_cgroup import RunCgroup
from fusedrl.engine.sandbox.runner import MAX_PROCESSES
import sandbox_kernel_testing as kernel_attack
import sandbox_testing as attack

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not detect().strong, reason=detect().describe())]


@pytest.fixture
def secrets(tmp_path):
    """A 0600 secret and a file of a run directory, both the trainer's."""
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    run_file = tmp_path / "run" / "config.yaml"
    run_file.parent.mkdir()
    run_file.write_text("policy: x")
    return secret, run_file


def test_no_file_outside_the_work_directory_is_read(secrets):
    secret, run_file = secrets
    readable = [str(secret), str(run_file), "/etc/shadow", "/etc/passwd",
                os.path.expanduser("~/.bashrc"), sysconfig.get_paths()["purelib"] + "/torch"]
    got = attack.reported(run_python(attack.read_files(readable)))
    assert got == []


def test_no_file_outside_the_work_directory_is_written(secrets, tmp_path):
    secret, run_file = secrets
    site = sysconfig.get_paths()["purelib"]
    pth = os.path.join(site, f"fusedrl-attack-{os.getpid()}.pth")
    targets = [str(secret), str(run_file), pth, str(tmp_path / "new.txt"),
               os.path.expanduser("~/.bashrc"), "../escaped.txt", "/usr/lib/owned.txt"]
    before = secret.read_bytes(), run_file.read_bytes()
    result = run_python(attack.write_files(targets) + "\nopen('inside.txt', 'w').write('ok')")
    assert attack.reported(result) == []
    assert (secret.read_bytes(), run_file.read_bytes()) == before
    for path in (pth, str(tmp_path / "new.txt"), "/usr/lib/owned.txt", "/escaped.txt"):
        assert not os.path.exists(path)


def test_no_network_direct_unix_or_through_setns(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    unix_path, abstract = str(tmp_path / "host.sock"), f"fusedrl-attack-{os.getpid()}"
    unix, hidden = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    hidden.bind("\0" + abstract)
    for s in (unix, hidden):
        s.listen(4)
    try:
        got = attack.reported(run_python(
            attack.reach_network(server.getsockname()[1], unix_path, abstract), timeout_s=8))
    finally:
        for s in (server, unix, hidden):
            s.close()
    assert got == []


def test_the_trainers_memory_and_environment_are_out_of_reach():
    assert attack.reported(run_python(attack.trainer_memory(os.getpid()))) == []


def test_no_descriptor_memory_or_environment_of_another_process_is_opened():
    """The box's pid 1 holds the trainer's pipes unless it closed them and is not dumpable."""
    assert attack.reported(run_python(attack.other_processes())) == []


def test_the_kernels_settings_are_out_of_reach():
    """What a root-owned sandbox could write without any capability: sysctls, sysrq."""
    targets = ["/proc/sys/kernel/core_pattern", "/proc/sys/vm/drop_caches", "/proc/sysrq-trigger",
               "/proc/sys/kernel/hostname"]
    assert attack.reported(run_python(attack.open_for_writing(targets))) == []


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the attack's syscall numbers: x86_64")
def test_the_kernels_attack_surface_is_denied():
    assert attack.reported(run_python(attack.kernel_surface())) == []


def test_only_unix_inet_and_inet6_sockets_are_made():
    assert attack.reported(run_python(attack.socket_families())) == []


def test_no_memory_outside_the_caps_is_held():
    assert attack.reported(run_python(attack.unbounded_shared_memory())) == []


def test_no_kernel_object_outside_the_caps_is_made():
    """System V semaphores held GiBs of kernel memory at memory_mb=64; an AIO context takes a
    host-wide count; inotify groups the trainer's uid's; ptys a host-wide count."""
    assert attack.reported(run_python(kernel_attack.kernel_objects())) == []


def test_each_tmpfs_caps_its_inodes():
    """Empty files take inodes, not blocks: a size cap alone let 200k of them in."""
    made = attack.reported(run_python(kernel_attack.fill_inodes(
        ["/tmp", "/sandbox", "/dev/shm"], 2 * TMPFS_INODES), timeout_s=20))
    # Each mount's root directory is one of its inodes; /sandbox holds main.py too.
    assert made[0] < TMPFS_INODES and made[1] < TMPFS_INODES and made[2] < SHM_INODES, made


def test_a_fork_bomb_meets_the_process_cap_and_leaves_nothing():
    marker = f"fusedrl-bomb-{os.getpid()}-{time.monotonic_ns()}"
    result = run_python(attack.fork_bomb(marker), timeout_s=5)
    held = attack.reported(result)[0]
    # The cap counts the sandbox's init and the program itself.
    assert 0 < held <= MAX_PROCESSES
    assert attack.left_after(marker) == []


@pytest.mark.skipif(not RunCgroup.memory_capped(),
                    reason="no writable memory cgroup: each process is capped (RLIMIT_AS), the "
                           "run's total is not (docs/safety.md)")
def test_the_runs_memory_is_capped_in_total():
    held = attack.reported(run_python(attack.memory_total(6, 100), memory_mb=256, timeout_s=8))[0]
    assert held <= 2  # 6 x 100 MiB asked for under 256 MiB for the whole run


def test_tmp_is_size_capped():
    written = attack.reported(run_python(attack.fill_tmp(4 * TMPFS_MB), memory_mb=1024,
                                         timeout_s=8))[0]
    assert written <= TMPFS_MB


def test_dev_is_read_only_and_dev_shm_size_capped():
    dev, shm = attack.reported(run_python(attack.fill({"/dev": 16, "/dev/shm": 4 * SHM_MB}),
                                          memory_mb=256, timeout_s=8))
    assert dev == 0 and shm <= SHM_MB


def test_nothing_is_left_after_the_deadline():
    marker = f"fusedrl-outlive-{os.getpid()}-{time.monotonic_ns()}"
    mine = os.path.join(tempfile.gettempdir(), f"fusedrl-sandbox-{os.getpid()}-*")
    result = run_python(attack.outlive(marker), timeout_s=1.0)
    assert result.timed_out and result.seconds <= 3.0
    assert attack.left_after(marker) == [] and glob.glob(mine) == []
