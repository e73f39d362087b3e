"""The static GPU records (docs/static_gpu.md) are newer than the kernels they cover: the commit
each record was made at (its `meta.git_commit`, a "-dirty" tree counted as that commit) is in HEAD's
history, and no later commit changes a Python file under `kernels/` (nor `csrc/`, for a record with
CUDA rows). A stale record is a failure; so is one whose commit is unknown. Reads git's history only.

    python tests/checks/static_records.py    # one line per stale record, exit 1 if any
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Each record and the command that rewrites it at the head (docs/static_gpu.md).
RECORDS = {
    "bench/results/static_gpu.json":
        "python tests/tools/static_gpu.py --check --json bench/results/static_gpu.json "
        "--table bench/results/static_gpu.md",
    "bench/results/static_gpu_triton36.json":
        "PYTHONPATH=.ci-triton36 TRITON_INTERPRET=1 python tests/tools/static_gpu.py --check "
        "--no-cuda --json bench/results/static_gpu_triton36.json "
        "--table bench/results/static_gpu_triton36.md",
}
# What a record compiles: every Triton kernel is defined under kernels/; the CUDA rows come from
# csrc/. Text under kernels/ (BACKENDS.md) compiles to nothing.
TRITON_SOURCES = ("kernels/*.py",)
CUDA_SOURCES = ("csrc",)


class HistoryUnavailable(Exception):
    """git or the history the check reads is missing (the message says which)."""


def git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)


def require_history(root: Path) -> None:
    """Raise HistoryUnavailable unless `root` is in a git work tree git can read."""
    if shutil.which("git") is None:
        raise HistoryUnavailable("git is not installed")
    if git(root, "rev-parse", "--verify", "HEAD").returncode != 0:
        raise HistoryUnavailable(f"{root} is not a git work tree with a commit")


def covered_paths(record: dict) -> tuple[str, ...]:
    """The pathspecs of the sources a record's rows were compiled from."""
    return TRITON_SOURCES + (CUDA_SOURCES if record.get("cuda") else ())


def record_problem(root: Path, name: str, record: dict) -> str | None:
    """Why the record `name` (its parsed JSON `record`) is older than what it covers, or None."""
    commit = str(record.get("meta", {}).get("git_commit", "unknown")).removesuffix("-dirty")
    if git(root, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        if git(root, "rev-parse", "--is-shallow-repository").stdout.strip() == "true":
            raise HistoryUnavailable(f"{name}'s commit {commit} is not in this shallow clone")
        return f"{name}: made at commit {commit!r}, which this repository does not have"
    if git(root, "merge-base", "--is-ancestor", commit, "HEAD").returncode != 0:
        return f"{name}: made at {commit[:12]}, which is not in HEAD's history"
    log = git(root, "log", "--format=%h %s", f"{commit}..HEAD", "--", *covered_paths(record))
    if log.returncode != 0:
        raise HistoryUnavailable(f"git log failed: {log.stderr.strip()}")
    later = log.stdout.splitlines()
    if not later:
        return None
    return (f"{name}: made at {commit[:12]}, {len(later)} later commit(s) change "
            f"{' '.join(covered_paths(record))} (latest: {later[0][:80]})")


def stale_records(root: Path = ROOT) -> list[str]:
    """One line per stale record under `root`, with the command that rewrites it; [] when all are
    current. Raises HistoryUnavailable where git cannot answer."""
    require_history(root)
    problems = []
    for name, command in RECORDS.items():
        record = json.loads((root / name).read_text())
        problem = record_problem(root, name, record)
        if problem:
            problems.append(f"{problem}; rewrite it at the head: {command}")
    return problems


def main() -> int:
    try:
        problems = stale_records()
    except HistoryUnavailable as why:
        print(f"static_records: not checked: {why}")
        return 0
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
