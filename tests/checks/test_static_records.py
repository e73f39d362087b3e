"""The static GPU records are newer than the last change to the kernels they cover
(tests/checks/static_records.py), on this repository and on a small one built here."""
import json
import os
import subprocess

import pytest

import static_records


def test_the_records_are_newer_than_their_kernels():
    try:
        problems = static_records.stale_records()
    except static_records.HistoryUnavailable as why:
        pytest.skip(f"no git history to read: {why}")
    assert not problems, "\n".join(problems)


def commit(repo, files: dict, message: str) -> str:
    """Write `files` (path -> text) in `repo`, commit them, return the commit's hash."""
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    run = lambda *args: subprocess.run(["git", "-C", str(repo), *args], check=True, env=env,
                                       capture_output=True, text=True).stdout.strip()
    run("add", "-A")
    run("commit", "-q", "-m", message)
    return run("rev-parse", "HEAD")


def records(made_at: str, cuda_rows: list) -> dict:
    text = lambda cuda: json.dumps({"meta": {"git_commit": made_at}, "triton": [], "cuda": cuda})
    return {"bench/results/static_gpu.json": text(cuda_rows),
            "bench/results/static_gpu_triton36.json": text([])}


@pytest.fixture
def repo(tmp_path):
    if static_records.shutil.which("git") is None:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    return tmp_path


def test_a_later_kernel_change_makes_a_record_stale(repo):
    made_at = commit(repo, {"kernels/attention/a.py": "x = 1\n", "csrc/b.cu": "//\n"}, "kernels")
    commit(repo, records(made_at + "-dirty", [{"kernel": "b"}]), "records")
    assert static_records.stale_records(repo) == []
    # Text under kernels/ and files elsewhere compile to nothing the records hold.
    commit(repo, {"kernels/BACKENDS.md": "text\n", "engine/c.py": "y = 2\n"}, "docs and engine")
    assert static_records.stale_records(repo) == []
    # CUDA sources: stale only the record with CUDA rows.
    commit(repo, {"csrc/b.cu": "// changed\n"}, "a CUDA change")
    stale = static_records.stale_records(repo)
    assert len(stale) == 1 and stale[0].startswith("bench/results/static_gpu.json: made at ")
    assert "a CUDA change" in stale[0] and "--json bench/results/static_gpu.json" in stale[0]
    # A Triton source, however deep: both.
    commit(repo, {"kernels/attention/a.py": "x = 2\n"}, "a kernel change")
    stale = static_records.stale_records(repo)
    assert [line.split(":")[0] for line in stale] == list(static_records.RECORDS)
    assert all("a kernel change" in line for line in stale)


def test_a_record_of_an_unknown_commit_is_stale(repo):
    commit(repo, {"kernels/a.py": "x = 1\n"}, "kernels")
    commit(repo, records("unknown", []), "records")
    stale = static_records.stale_records(repo)
    assert len(stale) == 2 and all("'unknown', which this repository does not have" in line
                                   for line in stale)


def test_a_directory_without_history_is_not_checked(tmp_path):
    with pytest.raises(static_records.HistoryUnavailable, match="not a git work tree"):
        static_records.stale_records(tmp_path)
