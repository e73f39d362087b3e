"""A weak mode's describe() names everything its code reached: each attack of
test_sandbox_attacks.py run under `unshare` (where it works here) and `none`, asked for, and
every hole it finds (the network, host files, unix socket files, the trainer's memory, AF_VSOCK
ports, System V IPC and the other kernel objects no cap counts) named in the one line that the
run prints; and every weak mode's line names AF_VSOCK whatever this kernel offers."""
import os
import shutil
import socket

import pytest

from fusedrl.engine.sandbox import detect, isolation, run_python
import sandbox_kernel_testing as kernel_attack
import sandbox_testing as attack

NONE = isolation.Isolation("none", network=False, filesystem=False, pids=False,
                           why_not_strong="not chosen")
# What each attack's report names -> what describe() must then say is not isolated.
NAMED = {"127.0.0.1": "the network", "\\x00": "abstract unix sockets", "setns": "the network",
         "host.sock": "host unix socket files", "secret.txt": "host files",
         "/proc/": "host processes", "mem": "the trainer's memory",
         # kernel_objects()'s names
         "vsock": "AF_VSOCK", "semget": "System V", "msgget": "System V", "shmget": "System V",
         "mq_open": "POSIX IPC", "io_setup": "AIO contexts", "inotify": "inotify",
         "fanotify": "fanotify", "pty": "ptys"}


def weak_modes():
    modes = [NONE]
    if shutil.which("unshare"):
        try:
            modes.append(detect("unshare"))
        except RuntimeError:
            pass
    return modes


@pytest.mark.parametrize("mode", weak_modes(), ids=lambda mode: mode.kind)
def test_a_weak_mode_names_everything_its_code_reached(mode, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    server, unix, hidden = (socket.socket(), socket.socket(socket.AF_UNIX),
                            socket.socket(socket.AF_UNIX))
    server.bind(("127.0.0.1", 0))
    unix.bind(str(tmp_path / "host.sock"))
    hidden.bind(f"\0fusedrl-weak-{os.getpid()}")
    for s in (server, unix, hidden):
        s.listen(4)
    try:
        reached = [*attack.reported(run_python(attack.reach_network(
                       server.getsockname()[1], str(tmp_path / "host.sock"),
                       f"fusedrl-weak-{os.getpid()}"), timeout_s=8, isolation=mode)),
                   *attack.reported(run_python(attack.read_files([str(secret)]),
                                               isolation=mode)),
                   *attack.reported(run_python(attack.trainer_memory(os.getpid()),
                                               isolation=mode)),
                   *attack.reported(run_python(kernel_attack.kernel_objects(), isolation=mode))]
    finally:
        for s in (server, unix, hidden):
            s.close()
    line = mode.describe()
    assert "\n" not in line and line.startswith(f"sandbox: {mode.kind} (WEAK")
    assert any("host.sock" in hole for hole in reached)  # a unix socket file: reached in both
    for hole in reached:
        said = [words for key, words in NAMED.items() if key in repr(hole) or key in hole]
        assert said and all(words in line for words in said), (hole, line)


@pytest.mark.parametrize("mode", [
    NONE, isolation.Isolation("unshare", network=True, filesystem=False, pids=True,
                              why_not_strong="x", program="/usr/bin/unshare"),
    isolation.Isolation("unshare", network=False, filesystem=False, pids=True,
                        why_not_strong="x", program="/usr/bin/unshare")],
    ids=["none", "unshare-plain-user", "unshare-root"])
def test_every_weak_mode_names_vsock_and_the_kernel_objects_it_leaves_open(mode):
    """A network namespace (a plain user's unshare) does not separate vsock's port space."""
    line = mode.describe()
    for words in ("AF_VSOCK", "System V and POSIX IPC", "AIO contexts", "inotify", "ptys"):
        assert words in line, (words, line)
