"""The sandbox under attack: each run returns within its timeout + 2 s, writes nothing outside its
work directory, reaches no listening socket on the host's loopback (where a network namespace is
available), cannot signal the caller, and leaves the caller running."""
import os
import socket
import tempfile
import threading
import time

import pytest

from fusedrl.engine.sandbox import SandboxPool, SandboxRefused, detect, isolation, run_python

pytestmark = pytest.mark.integration
ISOLATION = detect()


def within(result, timeout_s):
    assert result.seconds <= timeout_s + 2.0, result


def test_a_plain_program_runs_with_its_stdin_and_files():
    result = run_python("import sys\nprint(open('data/n.txt').read().strip(), sys.stdin.read()[::-1])",
                        stdin="abc", files={"data/n.txt": "41\n"})
    assert result.ok and result.stdout == "41 cba\n" and not result.truncated


def test_an_infinite_loop_is_killed_at_its_timeout():
    result = run_python("while True:\n    pass", timeout_s=1.0)
    assert result.timed_out and result.killed and not result.ok
    within(result, 1.0)


@pytest.mark.skipif(not ISOLATION.strong, reason="a weak mode caps no process count: a fork bomb "
                                                 "there would reach the machine's pid table")
def test_a_fork_bomb_ends_at_its_timeout_and_leaves_no_process():
    result = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                        "        pass", timeout_s=1.5)
    assert result.timed_out
    within(result, 1.5)
    # Nothing of it is left: a new run starts at once and the machine can still fork.
    assert run_python("print(1)").ok


def test_a_memory_bomb_fails_inside_its_limit():
    result = run_python("block = bytearray(4 << 30)\nprint('allocated')", memory_mb=256, timeout_s=5)
    assert not result.ok and "allocated" not in result.stdout and "MemoryError" in result.stderr
    within(result, 5)


def test_100_mb_of_output_is_capped():
    result = run_python("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))",
                        output_limit=4096, timeout_s=10)
    assert result.truncated and len(result.stdout) == 4096
    within(result, 10)


def test_writing_outside_its_directory_leaves_the_host_untouched(tmp_path):
    victim = tmp_path / "user_file.txt"
    victim.write_text("mine")
    # Names of this process's own: a file a weak mode let through in an earlier run (removed below,
    # but not by a run killed before it) can never pass for one this run wrote.
    outside = "/tmp/fusedrl-sandbox-escape-%d" % os.getpid()
    beside = "fusedrl-sandbox-escaped-%d.txt" % os.getpid()   # in the run directory's parent
    code = (f"for path in [{str(victim)!r}, {outside!r}, '../{beside}']:\n"
            "    try:\n        open(path, 'w').write('owned')\n    except OSError:\n        pass\n"
            "open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())")
    result = run_python(code)
    assert result.stdout == "fine\n"
    escaped = [path for path in (outside, os.path.join(tempfile.gettempdir(), beside)) if os.path.exists(path)]
    if ISOLATION.filesystem:
        assert victim.read_text() == "mine" and not escaped, escaped
    else:  # said at start: this machine hides no host files from the sandbox
        for path in escaped:
            os.remove(path)


@pytest.mark.skipif(not ISOLATION.network, reason="no network namespace on this machine")
def test_a_listening_socket_on_the_hosts_loopback_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                accepted.append(server.accept())
            except socket.timeout:
                pass

    watcher = threading.Thread(target=accept)
    watcher.start()
    result = run_python(f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), "
                        "timeout=2)\n    print('connected')\nexcept OSError as e:\n    print('refused')",
                        timeout_s=4)
    watcher.join()
    server.close()
    assert result.stdout == "refused\n" and not accepted


def test_signalling_its_parent_does_not_reach_the_caller():
    hits = []
    previous = __import__("signal").signal(15, lambda *_: hits.append(1))
    try:
        result = run_python("import os, signal\nfor pid in {os.getppid(), 1, %d}:\n    try:\n"
                            "        os.kill(pid, signal.SIGTERM)\n    except OSError:\n        pass"
                            % os.getpid(), timeout_s=3)
        time.sleep(0.2)
    finally:
        __import__("signal").signal(15, previous)
    assert result.returncode in (0, -15, 143)
    if ISOLATION.pids:
        assert not hits


def test_the_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("FUSEDRL_SECRET_TOKEN", "s3cret")
    result = run_python("import os\nprint(sorted(os.environ))")
    assert result.ok and "FUSEDRL_SECRET_TOKEN" not in result.stdout


def test_a_pool_runs_many_within_its_cap_in_order():
    with SandboxPool(max_concurrent=2) as pool:
        results = pool.map([f"print({i} * {i})" for i in range(5)])
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(5)]


@pytest.mark.parametrize("bad, match", [(dict(timeout_s=0), "timeout_s=0"),
                                        (dict(timeout_s=float("inf")), "timeout_s=inf"),
                                        (dict(memory_mb=8), "memory_mb=8"),
                                        (dict(files={"../x": ""}), "'../x'")])
def test_bad_arguments_are_one_line(bad, match):
    with pytest.raises(ValueError, match=match):
        run_python("pass", **bad)


def test_isolation_says_what_holds_in_one_line():
    line = ISOLATION.describe()
    assert "\n" not in line and line.startswith(f"sandbox: {ISOLATION.kind}")


def test_without_a_strong_sandbox_the_models_code_is_refused_in_one_line(monkeypatch, capfd):
    weak = isolation.Isolation("none", network=False, filesystem=False, pids=False,
                               why_not_strong="bwrap not found")
    monkeypatch.setattr(isolation, "detect", lambda prefer="auto": weak)
    monkeypatch.setenv(isolation.ALLOW_WEAK_ENV, "0")
    with pytest.raises(SandboxRefused) as refused:
        run_python("print(1)")
    line = str(refused.value)
    assert "\n" not in line and "sandbox.allow_weak_isolation=true" in line
    # At a run's start: refused at once for fusedrl's sandbox reward or tool, said for others.
    with pytest.raises(SandboxRefused, match="allow_weak_isolation"):
        with isolation.open_sandbox(False, ["fusedrl.engine.sandbox.code_tests:code_tests"]):
            pass
    with isolation.open_sandbox(False, ["my_rewards:score"]) as mode:
        assert mode == "none"
    assert capfd.readouterr().err == ""  # recorded, not said: this run runs no model code
    with isolation.open_sandbox(False, ["my_rewards:score"], multi_turn=True) as mode:
        assert mode == "none"
    assert "sandbox: none (WEAK" in capfd.readouterr().err
    with isolation.open_sandbox(True, ["fusedrl.engine.sandbox:python"]) as mode:
        assert mode == "none"
        assert run_python("print(1)").stdout == "1\n"  # asked for: it runs, weakly
    with pytest.raises(SandboxRefused):  # the run over: the caller's environment again
        run_python("print(1)")


def test_a_runs_sandbox_settings_end_with_it(monkeypatch):
    """The weak-mode permission and the reward timeout a run passes to its workers through the
    environment are the run's alone: restored when it ends (raising too), none left for the next."""
    monkeypatch.delenv(isolation.ALLOW_WEAK_ENV, raising=False)
    monkeypatch.setenv(isolation.REWARD_TIMEOUT_ENV, "7")  # the caller's own
    with isolation.open_sandbox(True, reward_timeout_s=5.0):
        assert os.environ[isolation.ALLOW_WEAK_ENV] == "1"
        assert os.environ[isolation.REWARD_TIMEOUT_ENV] == "5.0"
    assert isolation.ALLOW_WEAK_ENV not in os.environ
    assert os.environ[isolation.REWARD_TIMEOUT_ENV] == "7"
    with pytest.raises(RuntimeError), isolation.open_sandbox(False, reward_timeout_s=0.0):
        assert isolation.REWARD_TIMEOUT_ENV not in os.environ  # no timeout: none passed on
        raise RuntimeError("the run failed")
    assert os.environ[isolation.REWARD_TIMEOUT_ENV] == "7"
    assert isolation.ALLOW_WEAK_ENV not in os.environ
