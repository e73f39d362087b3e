"""Running the `fusedrl` command in-process or as the user does (a subprocess), for error tests."""
import os
import subprocess
import sys

from fusedrl.engine import cli


def cli_error(argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of cli.main(argv) in this process."""
    code = cli.main(argv)
    return code, capsys.readouterr().err


def run_fusedrl(*argv, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    """`fusedrl ARGV...` in a fresh interpreter (what a user's shell runs), without FUSEDRL_DEBUG."""
    environ = {k: v for k, v in os.environ.items() if k != "FUSEDRL_DEBUG"}
    return subprocess.run([sys.executable, "-m", "fusedrl.engine.cli", *argv], capture_output=True, text=True,
                          cwd=cwd, env={**environ, **(env or {})}, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The process failed with `code` and said so on one stderr line containing every fragment."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
