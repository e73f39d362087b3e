"""Which tests start other processes (torchrun ranks, the `fusedrl` command, scripts), read from a
test module's source without importing it: the xdist controller, which imports no test module,
decides with it too (tests/conftest.py).

A test starts processes when its function, a fixture it names, or a module-level function either
calls (followed through the module) refers to a process starter: a module that only starts
processes (`subprocess`), or one of the helpers below. A test of the same module that reads data
or calls the command in-process (`cli_error`) runs alone, with no process setup.
"""
from __future__ import annotations

import ast
import functools
import pathlib

# Dotted origins: a name imported from one of these modules, or the module itself, starts
# processes; so do the named helpers of the shared test modules and of bench's static check
# (recording and compiling in child processes; its row checks are pure functions), whether
# imported by name or read as an attribute of their module (`static_gpu.main`).
PROCESS_STARTERS = {"subprocess", "multiprocessing", "torch.multiprocessing", "static_gpu.main",
                    "static_gpu.build_report", "gpucheck.record.record_workload",
                    "triton_prebuild.main", "triton_prebuild.prebuild",
                    "dist_testing.run_ranks", "dist_testing.torchrun",
                    "dist_testing.torchrun_nodes", "dist_testing.torchrun_runs",
                    "cli_testing.run_fusedrl"}


def _is_starter(origin: str) -> bool:
    return any(origin == s or origin.startswith(s + ".") for s in PROCESS_STARTERS)


def _starter_names(tree: ast.Module) -> set[str]:
    """The module's names bound to a process starter by its imports: a bare name, or `module.name`
    for a starter read as an attribute of a module imported whole."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_starter(alias.name):
                    names.add(alias.asname or alias.name.split(".")[0])
                bound = alias.asname or alias.name
                names.update(bound + s[len(alias.name):] for s in PROCESS_STARTERS
                             if s.startswith(alias.name + "."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if _is_starter(f"{node.module}.{alias.name}"):
                    names.add(alias.asname or alias.name)
    return names


def _names_used(node: ast.AST) -> set[str]:
    """Every name a function reads or calls (`module.attribute` too), and the names of its arguments
    (fixtures, for a test or a fixture)."""
    used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    used |= {f"{n.value.id}.{n.attr}" for n in ast.walk(node)
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    return used | {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}


@functools.lru_cache(maxsize=None)
def _starting_functions(path: pathlib.Path) -> frozenset[str]:
    """The names of the module's functions (tests, fixtures, helpers, methods) that start processes,
    directly or through another of its functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    uses: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            uses.setdefault(node.name, set()).update(_names_used(node))
    starting = set(_starter_names(tree))
    while True:
        more = {name for name, used in uses.items() if name not in starting and used & starting}
        if not more:
            return frozenset(starting & uses.keys())
        starting |= more


def starts_processes(path: pathlib.Path, nodeid: str) -> bool:
    """Whether the test `nodeid` (module::[Class::]name[params]) of the module at `path` starts
    processes."""
    name = nodeid.split("::")[-1].split("[", 1)[0]
    return name in _starting_functions(path)

