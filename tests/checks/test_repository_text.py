"""The repository's text says what is, not how it came to be: no issue numbers or commit hashes in
the code, tests, docs or README (results files under bench/results/ keep their commit as data), and
every repository path the docs and the README name exists."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Where history must not be written; bench/results/ records runs, their commit among their data.
FOLDERS = ("engine", "kernels", "csrc", "tests", "docs", "bench", ".ci")
SKIPPED = ("bench/results/",)
TEXT_SUFFIXES = {".py", ".md", ".cu", ".cuh", ".cpp", ".h", ".sh", ".yaml", ".toml", ".txt", ""}
ISSUE = re.compile(r"\b[Ii]ssues? #?\d+\b|(?<![\w&#$/{'\"])#\d+\b")
# A hexadecimal word of 7-40 characters with a letter and a digit: an abbreviated or full hash.
COMMIT_HASH = re.compile(r"(?<![\w.-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w-])")
# A path below one of the repository's top-level folders, as the docs write them.
REPO_PATH = re.compile(r"(?<![\w./-])((?:engine|kernels|csrc|bench|tests|docs|\.ci)/[\w./*-]*[\w*])")
# Build outputs the docs name: the CUDA extension (setup.py's EXTENSION) exists once built.
BUILT = re.compile(r"(^|/)_C\.[\w.-]+\.so$")


def text_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*")):
            relative = path.relative_to(ROOT).as_posix()
            if (path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts
                    and not relative.startswith(SKIPPED)):
                files.append(path)
    return files


def history_marks(text: str) -> list[str]:
    """The issue numbers and commit hashes written in `text`."""
    return [m.group(0) for m in ISSUE.finditer(text)] + [m.group(0) for m in COMMIT_HASH.finditer(text)]


def missing_paths(text: str) -> list[str]:
    """The repository paths named in `text` (globs allowed) that match nothing."""
    missing = []
    for path in REPO_PATH.findall(text):
        found = list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()
        if not found and not BUILT.search(path):
            missing.append(path)
    return missing


def test_no_issue_numbers_or_commit_hashes():
    found = []
    for path in text_files():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(ROOT)}:{i}: {mark}" for i, line in enumerate(lines, 1)
                  for mark in history_marks(line)]
    assert found == [], "history in the code (say what is, not how it came to be):\n" + "\n".join(found)


def test_every_path_named_in_the_docs_exists():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "kernels").glob("*.md"))]
    found = [f"{doc.relative_to(ROOT)}:{i}: {path}" for doc in docs
             for i, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
             for path in missing_paths(line)]
    assert found == [], "paths the docs name that do not exist:\n" + "\n".join(found)


# The marks are written in pieces so that this file holds none of them whole.
ISSUE_MARK, REF_MARK = "issue " + "12", "#" + "35"
SHORT_HASH = "4c7e" + "d3a"
FULL_HASH = SHORT_HASH * 5 + "e"


@pytest.mark.parametrize("text, marks", [
    (f"the bar of {ISSUE_MARK}", [ISSUE_MARK]),
    (f"fixed in {REF_MARK} at last", [REF_MARK]),
    (f"measured at commit {SHORT_HASH}", [SHORT_HASH]),
    (f"a full {FULL_HASH} hash", [FULL_HASH]),
    ("step-00000012, 2147483647, 0x7fffffff, a [1, 2] list, `# 3` heading, deadbeef", []),
])
def test_history_marks_are_found(text, marks):
    assert history_marks(text) == marks


def test_missing_paths_are_found():
    assert missing_paths("see `engine/no_such_module.py` and engine/errors.py") == ["engine/no_such_module.py"]
    assert missing_paths("bench/results/*.json, kernels/_C.cpython-312-x86_64-linux-gnu.so") == []
