"""A weak mode's describe() names everything its code reached: each attack of
test_sandbox_attacks.py run under `unshare` (where it works here) and `none`, asked for, and
every hole it finds (the network, host files, unix socket files, the trainer's memory) named in
the one line that the run prints."""
import os
import shutil
import socket

import pytest

from fusedrl.engine.sandbox import detect, isolation, run_python
import sandbox_testing as attack

NONE = isolation.Isolation("none", network=False, filesystem=False, pids=False,
                           why_not_strong="not chosen")
# What each attack's report names -> what describe() must then say is not isolated.
NAMED = {"127.0.0.1": "the network", "\\x00": "abstract unix sockets", "setns": "the network",
         "host.sock": "host unix socket files", "secret.txt": "host files",
         "/proc/": "host processes", "mem": "the trainer's memory"}


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
                                               isolation=mode))]
    finally:
        for s in (server, unix, hidden):
            s.close()
    line = mode.describe()
    assert "\n" not in line and line.startswith(f"sandbox: {mode.kind} (WEAK")
    assert any("host.sock" in hole for hole in reached)  # a unix socket file: reached in both
    for hole in reached:
        said = [words for key, words in NAMED.items() if key in repr(hole) or key in hole]
        assert said and all(words in line for words in said), (hole, line)
