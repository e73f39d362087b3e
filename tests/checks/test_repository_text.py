"""The repository's text says what is, not how it came to be: no issue numbers or commit hashes in
the code, tests, docs or README (results files under bench/results/ keep their commit as data);
every repository path the docs and the README name exists, and so does every module and folder that
docs/architecture.md's tree and the packages' docstrings name, where they name them."""
import ast
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
# A module or folder named inside a folder's text: `sequence.py`, `checkpoint/`.
LOCAL_NAME = re.compile(r"(?<![\w./-])([A-Za-z_]\w*(?:\.py|/))(?![\w/])")
# Where docs/architecture.md's tree puts a folder's name; its descriptions are indented further.
TREE_NAME_COLUMNS = 20
# The packages every module of which docs/architecture.md's tree names.
TREE_PACKAGES = ("engine", "kernels")
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


def names_missing_under(folder: Path, text: str) -> list[str]:
    """The modules (`x.py`) and folders (`x/`) named in `text` that exist nowhere below `folder`
    (nor at the repository's top: `setup.py`, `csrc/`)."""
    missing = []
    for name in LOCAL_NAME.findall(text):
        hits = [p for p in folder.rglob(name.rstrip("/")) if p.is_dir() or not name.endswith("/")]
        if name.rstrip("/") != folder.name and not hits and not (ROOT / name).exists():
            missing.append(name)
    return missing


def tree_lines(tree: str, root: Path = ROOT):
    """(line number, the folder the line stands in, the line) for each line of a layout tree. A name
    in the first TREE_NAME_COLUMNS columns that ends in / opens a folder inside the one less
    indented; every line is read against the folder it stands in."""
    folders: list[tuple[int, Path]] = []
    for i, line in enumerate(tree.splitlines(), 1):
        indent = len(line) - len(line.lstrip())
        if line.strip() and indent < TREE_NAME_COLUMNS:
            while folders and folders[-1][0] >= indent:
                folders.pop()
            first = line.split()[0]
            if first.endswith("/"):
                folders.append((indent, (folders[-1][1] if folders else root) / first.rstrip("/")))
        yield i, (folders[-1][1] if folders else root), line


def tree_misses(tree: str, root: Path = ROOT) -> list[str]:
    """'line: name' for each module or folder a layout tree names that its folder does not hold."""
    return [f"{i}: {name}" for i, folder, line in tree_lines(tree, root)
            for name in names_missing_under(folder, line)]


def unnamed_modules(tree: str, packages: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """The modules (`x.py`, less `__init__.py` and `__main__.py`) below `packages` that no line of
    the tree names: a name counts for every module of that name below the folder its line stands
    in (`ppo/: trainer.py` under `stages/` names stages' trainer.py modules)."""
    named = {hit for _, folder, line in tree_lines(tree, root) for name in LOCAL_NAME.findall(line)
             if name.endswith(".py") for hit in folder.rglob(name)}
    modules = [path for package in packages for path in sorted((root / package).rglob("*.py"))
               if path.name not in ("__init__.py", "__main__.py") and "__pycache__" not in path.parts]
    return [path.relative_to(root).as_posix() for path in modules if path not in named]


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


def architecture_tree() -> str:
    return (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").split("```")[1]


def test_the_architecture_tree_names_what_exists():
    assert tree_misses(architecture_tree()) == [], "docs/architecture.md's tree names what does not exist"


def test_the_architecture_tree_names_every_module():
    missing = unnamed_modules(architecture_tree(), TREE_PACKAGES)
    assert missing == [], "modules docs/architecture.md's tree does not name:\n" + "\n".join(missing)


def test_package_docstrings_name_what_exists():
    inits = sorted([*(ROOT / "engine").rglob("__init__.py"), *(ROOT / "kernels").rglob("__init__.py")])
    found = [f"{init.relative_to(ROOT)}: {name}" for init in inits
             for name in names_missing_under(init.parent, ast.get_docstring(ast.parse(
                 init.read_text(encoding="utf-8"))) or "")]
    assert found == [], "package docstrings name what does not exist:\n" + "\n".join(found)


def test_every_engine_package_has_its_test_folder():
    """tests/engine/ mirrors the engine: each package below engine/ (a folder with __init__.py)
    has the folder of the same path under tests/engine/, holding test files."""
    packages = sorted(init.parent.relative_to(ROOT / "engine")
                      for init in (ROOT / "engine").rglob("*/__init__.py"))
    missing = [package.as_posix() for package in packages
               if not any((ROOT / "tests" / "engine" / package).glob("test_*.py"))]
    assert missing == [], "engine packages without a test folder: " + ", ".join(missing)


def test_the_engine_docstring_names_every_subpackage():
    doc = ast.get_docstring(ast.parse((ROOT / "engine" / "__init__.py").read_text(encoding="utf-8")))
    subpackages = sorted(p.parent.name for p in (ROOT / "engine").glob("*/__init__.py"))
    assert [name for name in subpackages if f"{name}/" not in doc] == []


def test_tree_misses_are_found(tmp_path: Path):
    (tmp_path / "pkg" / "inner").mkdir(parents=True)
    (tmp_path / "pkg" / "inner" / "real.py").write_text("")
    tree = ("pkg/                real.py, gone.py\n  inner/            real.py, inner/, ghost/\n"
            "                    continued: real.py, lost.py\nother/              x.py\n")
    assert tree_misses(tree, tmp_path) == ["1: gone.py", "2: ghost/", "3: lost.py", "4: x.py"]


def test_unnamed_modules_are_found(tmp_path: Path):
    (tmp_path / "pkg" / "inner").mkdir(parents=True)
    for module in ("__init__.py", "named.py", "inner/deep.py", "inner/unnamed.py", "inner/later.py"):
        (tmp_path / "pkg" / module).write_text("")
    tree = ("pkg/                named.py\n  inner/            deep.py, and more:\n"
            "                    later.py\nother/              unnamed.py\n")
    assert unnamed_modules(tree, ("pkg",), tmp_path) == ["pkg/inner/unnamed.py"]


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
