"""bubblewrap is found once, on the caller's PATH, and every run starts that file (a run's own PATH
is a fixed one, without the caller's directories); a bubblewrap the sandbox's user cannot start
(a root trainer's sandbox runs as a fresh uid that enters no root-only directory) is
refused at detection in one line naming it and why, or passed over for one later on PATH that
works; a PATH without one is named in the refusal. test_sandbox_as_plain_user.py runs the first
case with the trainer as a plain user."""
import os
import shutil
import tempfile

import pytest

from fusedrl.engine.sandbox import SandboxRefused, detect, isolation, run_mounts, run_python
import sandbox_testing as attack

BWRAP = detect().program  # the suite's: an absolute path
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not detect().strong, reason=detect().describe())]


@pytest.fixture
def with_path(monkeypatch):
    """Sets PATH and detects again (and once more after the test, with the suite's PATH); a weak
    mode not asked for."""
    monkeypatch.setenv(isolation.ALLOW_WEAK_ENV, "0")

    def put(path):
        monkeypatch.setenv("PATH", str(path))
        detect.cache_clear()
    yield put
    monkeypatch.undo()
    detect.cache_clear()


def first_on_path(directory) -> str:
    return f"{directory}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.skipif(not os.path.isdir("/var/tmp"), reason="no /var/tmp")
def test_the_bwrap_found_off_the_fixed_path_is_the_one_that_runs(with_path):
    # Where the sandbox's user (a root trainer's fresh uid too) may enter: not /root.
    directory = tempfile.mkdtemp(prefix="fusedrl-bwrap-", dir="/var/tmp")
    try:
        os.chmod(directory, 0o755)
        wrapper = attack.bwrap_wrapper(directory, BWRAP)
        with_path(first_on_path(directory))
        assert detect().program == wrapper
        result = run_python("print(1)")
        assert result.stdout == "1\n" and attack.WRAPPER_MARK in result.stderr, result
    finally:
        shutil.rmtree(directory)


@pytest.mark.skipif(os.geteuid() != 0, reason="a root trainer's sandbox runs as a fresh uid")
def test_a_bwrap_the_sandbox_cannot_start_is_refused_in_one_line(with_path, tmp_path):
    hidden = tmp_path / "bin"  # under /tmp, in a directory only root may enter
    hidden.mkdir()
    hidden.chmod(0o700)
    wrapper = attack.bwrap_wrapper(str(hidden), BWRAP)
    with_path(hidden)
    found = detect()
    assert not found.strong
    assert "\n" not in found.why_not_strong and f"bwrap at {wrapper} " in found.why_not_strong
    assert "Permission denied" in found.why_not_strong or "No such file" in found.why_not_strong
    with pytest.raises(SandboxRefused) as refused:
        run_python("print(1)")
    assert "\n" not in str(refused.value) and wrapper in str(refused.value)
    # One it can start, later on PATH, is the one used.
    with_path(f"{hidden}{os.pathsep}{os.path.dirname(BWRAP)}")
    assert detect().strong and detect().program == BWRAP
    assert run_python("print(1)").stdout == "1\n"


def test_a_path_without_bwrap_is_refused_naming_it(monkeypatch, with_path, tmp_path):
    with_path(tmp_path)
    assert detect().why_not_strong == f"bwrap not found on PATH={tmp_path}"
    with pytest.raises(SandboxRefused, match=f"PATH={tmp_path}"):
        run_python("print(1)")


def test_a_run_whose_capped_mounts_cannot_be_made_is_refused_or_said_in_one_line(monkeypatch,
                                                                                with_path):
    """The tmpfs are mounted (size and inodes capped) before bubblewrap starts. Where that fails,
    a root trainer has no strong mode (it can always mount: something is wrong), said at
    detection; a plain user (whom Ubuntu's AppArmor may forbid mounting in a user namespace of its
    own) keeps bubblewrap with its tmpfs capped in size only, and describe() says why."""
    monkeypatch.setitem(run_mounts.MOUNTS, "tmp", ("/tmp", 64, "not-a-count"))
    with_path(os.path.dirname(BWRAP))
    found = detect()
    said = found.why_not_strong if os.geteuid() == 0 else found.describe()
    assert found.strong == (os.geteuid() != 0) and "\n" not in said
    assert "run_mounts.py" in said and BWRAP in said
    if found.strong:
        assert "inodes NOT capped" in said
        assert run_python("print(1)").stdout == "1\n"
