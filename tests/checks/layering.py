"""The import graph of fusedrl.engine and fusedrl.kernels, read from the source (nothing imported):
import cycles (every import counts, TYPE_CHECKING and function-level ones included), package-level
cycles (two packages importing each other, directly or around a loop, through any of their
modules: each package is a unit, each module directly in fusedrl.engine or fusedrl.kernels its
own), engine imports of private kernel modules (anything below `fusedrl.kernels` but the package
itself and its public subpackages, PUBLIC_KERNEL_PACKAGES), upward imports between the engine's
layers, duck-typed upward calls (getattr / hasattr / setattr of an attribute the parallel layout
owns, which reaches a layer above without importing it), a stage's config section read below the
stages (STAGE_SECTIONS), library files long enough to ask for a
split by concept, and library lines over 100 characters.

    python tests/checks/layering.py         # prints the report; exit 1 when any rule is broken
    python tests/checks/layering.py --json  # the same as one JSON object
"""
from __future__ import annotations

import argparse
import ast
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = {"fusedrl.kernels": ROOT / "kernels", "fusedrl.engine": ROOT / "engine"}
# Kernel subpackages whose __init__ is public API like fusedrl.kernels' own: the engine may import
# them (not the modules below them). fusedrl.kernels.attention holds every attention path the
# engine's attention module calls, with their decider.
PUBLIC_KERNEL_PACKAGES = {"fusedrl.kernels.attention"}
# A file this long is asking to be cut by concept; the bound is a prompt to split, not a target to
# squeeze code under (long lines are their own rule).
MAX_LINES = 500
MAX_LINE_CHARS = 100
# The engine's top-level packages and loose modules, from the bottom up: each imports only those
# before it (the one rule that makes the engine a stack of layers; a new top-level package takes
# its place here or the check fails). Processes the trainer starts for user and model code belong
# to the sandbox, below data and the model; agents (environments, tools) sit on generation and the
# sandbox and below the stages that train with them.
ENGINE_LAYERS = ["errors", "exact_reasons", "ranks", "runs", "config", "sandbox", "data", "model", "parallel",
                 "inference", "train", "plan", "agents", "stages", "demos", "trainers", "api", "cli"]
# (importer prefix, forbidden import prefix): what the order above still allows and must not be.
FORBIDDEN = [
    ("fusedrl.kernels", "fusedrl.engine"),
    # The parallel layout lays models out; it reads no data.
    ("fusedrl.engine.parallel", "fusedrl.engine.data"),
    # Generation takes its own arguments (SamplingParams, Request), never a stage's config: the
    # engine is usable without the config package, and its few refusals are its own rules.
    ("fusedrl.engine.inference", "fusedrl.engine.config"),
] + [
    # The oracle imports none of the kernels it checks.
    ("fusedrl.kernels.reference", f"fusedrl.kernels.{family}") for family in (
        "rl", "model", "attention", "invariant", "sampling")]
# Attributes the parallel layout owns (set by engine/parallel/ on the models it lays out, declared
# on the model classes): read by name with getattr / hasattr / setattr they are an upward call the
# import graph does not show.
LAYOUT_ATTRIBUTES = {"tensor_parallel", "offloaded", "expert_shard", "data_sharded",
                     "past_fsdp_hooks"}
# The sections only some stages' configs have (config/ppo.py, config/distill.py): a layer below the
# stages takes what it needs of them as a typed input its stage's config builds (ParallelJob,
# SamplingParams), never the section. Read by name with getattr / hasattr anywhere below the
# stages, or as an attribute in STAGE_FREE, they are a stage's option guessed at from below.
STAGE_SECTIONS = {"rollout", "teacher", "ppo", "reward", "reward_model", "critic_lora", "distill"}
BELOW_STAGES = ["ranks", "runs", "sandbox", "data", "model", "parallel", "inference", "train",
                "plan"]
# The plan sizes the rollout a PPO config describes: it alone reads those sections' fields.
STAGE_FREE = ["ranks", "runs", "sandbox", "data", "model", "parallel", "inference", "train"]


def modules() -> dict[str, pathlib.Path]:
    """Module name -> file, for every .py below the two packages (a package is its __init__)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package] + parts)] = path
    return found


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))
    return node.module or ""


def _bound_in_package(path: pathlib.Path) -> set[str]:
    """Names a package's __init__ binds to something other than its submodule of that name: `from
    pkg import name` then gets that object (a function named like its module), not the submodule."""
    if path.name != "__init__.py":
        return set()
    bound = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or node.level != 1):
            bound |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
    return bound


def imports_of(name: str, path: pathlib.Path, known: dict[str, pathlib.Path]) -> set[str]:
    """The known modules `name` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(name, is_package, node)
            bound = _bound_in_package(known[module]) if module in known else set()
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{module}.{alias.name}"
                targets.append(sub if sub in known and alias.name not in bound else module)
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def within(module: str, prefix: str) -> bool:
    """`module` is `prefix` or below it."""
    return module == prefix or module.startswith(prefix + ".")


def private_kernel_module(module: str) -> bool:
    """`module` is below fusedrl.kernels and not one of its public packages."""
    return module.startswith("fusedrl.kernels.") and module not in PUBLIC_KERNEL_PACKAGES


def duck_typed_calls(name: str, path: pathlib.Path) -> list[str]:
    """'module:line getattr(..., "attribute")' for each getattr / hasattr / setattr in `name`'s file
    whose attribute is a constant naming one of LAYOUT_ATTRIBUTES."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in LAYOUT_ATTRIBUTES):
            found.append(f"{name}:{node.lineno} {node.func.id}(..., {node.args[1].value!r})")
    return found


def stage_section_reads(name: str, path: pathlib.Path) -> list[str]:
    """'module:line read' for each read of a STAGE_SECTIONS name in a layer below the stages:
    getattr / hasattr of it by name in BELOW_STAGES, `x.section` in STAGE_FREE."""
    layer = engine_layer(name)
    if layer not in BELOW_STAGES:
        return []
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in STAGE_SECTIONS):
            found.append(f"{name}:{node.lineno} {node.func.id}(..., {node.args[1].value!r})")
        elif (isinstance(node, ast.Attribute) and node.attr in STAGE_SECTIONS
              and layer in STAGE_FREE):
            found.append(f"{name}:{node.lineno} .{node.attr}")
    return found


def package_of(module: str, known: dict[str, pathlib.Path]) -> str:
    """The unit `module` counts for in the package graph: its package (a package is its own), or
    itself when it lies directly in fusedrl.engine or fusedrl.kernels (their loose modules, errors.py
    or dispatch.py, are leaves or roots each, not one package everything passes through)."""
    if module in PACKAGES or known[module].name == "__init__.py":
        return module
    package = module.rpartition(".")[0]
    return module if package in PACKAGES else package


def package_graph(graph: dict[str, set[str]], known: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """The module graph collapsed onto package_of: unit -> the other units it imports."""
    out: dict[str, set[str]] = {}
    for name, targets in graph.items():
        unit = out.setdefault(package_of(name, known), set())
        unit |= {package_of(t, known) for t in targets} - {package_of(name, known)}
    return out


def engine_layer(module: str) -> str | None:
    """The top-level engine unit `module` belongs to (`stages` for fusedrl.engine.stages.ppo.x,
    `errors` for fusedrl.engine.errors); None for the engine's own __init__ and for kernels."""
    parts = module.split(".")
    return parts[2] if module.startswith("fusedrl.engine.") else None


def layer_order_breaks(graph: dict[str, set[str]]) -> list[str]:
    """'importer -> imported' for each import between top-level engine units that does not go down
    ENGINE_LAYERS, and 'unplaced: unit' for each top-level unit the list does not name."""
    rank = {name: i for i, name in enumerate(ENGINE_LAYERS)}
    found = set()
    for name, targets in graph.items():
        low = engine_layer(name)
        if low is None:
            continue
        if low not in rank:
            found.add(f"unplaced: {low}")
            continue
        for target in targets:
            high = engine_layer(target)
            if high is not None and high != low and high in rank and rank[high] > rank[low]:
                found.add(f"{low} -> {high} ({name} -> {target})")
    return sorted(found)


def top_level_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph collapsed onto the engine's top-level units (engine_layer)."""
    out: dict[str, set[str]] = {}
    for name, targets in graph.items():
        unit = engine_layer(name)
        if unit is not None:
            out.setdefault(unit, set()).update(
                t for t in map(engine_layer, targets) if t is not None and t != unit)
    for targets in list(out.values()):
        for target in targets:
            out.setdefault(target, set())
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def report() -> dict:
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    private = sorted(f"{name} -> {target}" for name, targets in graph.items()
                     if name.startswith("fusedrl.engine") for target in targets
                     if private_kernel_module(target))
    upward = sorted({f"{name} -> {target}" for name, targets in graph.items() for target in targets
                     for low, high in FORBIDDEN if within(name, low) and within(target, high)})
    ducks = sorted(call for name, path in known.items() if within(name, "fusedrl.engine")
                   for call in duck_typed_calls(name, path))
    sections = sorted(read for name, path in known.items() for read in stage_section_reads(name, path))
    texts = {path: path.read_text(encoding="utf-8").splitlines() for path in known.values()}
    long_files = sorted(f"{path.relative_to(ROOT)}: {len(lines)}" for path, lines in texts.items()
                        if len(lines) > MAX_LINES)
    long_lines = sorted(f"{path.relative_to(ROOT)}:{i}: {len(line)}" for path, lines in texts.items()
                        for i, line in enumerate(lines, 1) if len(line) > MAX_LINE_CHARS)
    return {"cycles": cycles(graph), "package_cycles": cycles(package_graph(graph, known)),
            "top_level_cycles": cycles(top_level_graph(graph)),
            "layer_order": layer_order_breaks(graph),
            "private_kernel_imports": private, "upward_imports": upward,
            "duck_typed_calls": ducks, "stage_section_reads": sections, "files_over_limit": long_files, "lines_over_limit": long_lines}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    found = report()
    if parser.parse_args().json:
        print(json.dumps(found, indent=1))
    else:
        for key, rows in found.items():
            print(f"{key}: {len(rows)}")
            for row in rows:
                print(f"  {' <-> '.join(row) if isinstance(row, list) else row}")
    return 1 if any(found.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
