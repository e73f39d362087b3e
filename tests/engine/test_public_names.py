"""fusedrl.engine's public names are each defined once in engine/: no internal function or class
shadows one (a stage's own entry point is `train_<stage>`, the public call `run_<stage>`)."""
import ast
from pathlib import Path

import fusedrl.engine as engine

ENGINE = Path(engine.__file__).parent


def _top_level_definitions() -> dict[str, list[str]]:
    """name -> the engine modules (dotted, relative to fusedrl.engine) defining it at top level."""
    found: dict[str, list[str]] = {}
    for path in sorted(ENGINE.rglob("*.py")):
        module = "." + ".".join(path.relative_to(ENGINE).with_suffix("").parts)
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.setdefault(node.name, []).append(module)
    return found


def test_every_public_name_is_defined_once_where_the_package_loads_it():
    definitions = _top_level_definitions()
    for name in engine.__all__:
        assert definitions.get(name) == [engine._PUBLIC[name]], (
            f"fusedrl.engine.{name} is loaded from {engine._PUBLIC[name]} but defined in "
            f"{definitions.get(name)}")
