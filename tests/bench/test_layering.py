"""The layering rules of bench/layering.py hold on the tree, and the checker finds what it should."""
import ast
import pathlib

import layering


def test_the_tree_keeps_its_layers():
    found = layering.report()
    assert found["cycles"] == []
    assert found["private_kernel_imports"] == []
    assert found["upward_imports"] == []
    assert found["files_over_limit"] == []


def test_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert layering.cycles(graph) == [["a", "b", "c"]]
    assert layering.cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_submodule_imports_resolve(tmp_path: pathlib.Path):
    known = {"fusedrl.engine.x": tmp_path / "x.py", "fusedrl.engine.y": tmp_path / "y.py",
             "fusedrl.kernels": tmp_path / "k.py", "fusedrl.kernels.sampling": tmp_path / "s.py"}
    source = ("from . import y\nfrom ..kernels import sampling\nfrom ..kernels import gae\n"
              "def f():\n    from ..kernels.sampling import thing\n")
    path = tmp_path / "x.py"
    path.write_text(source)
    assert ast.parse(source)
    assert layering.imports_of("fusedrl.engine.x", path, known) == {
        "fusedrl.engine.y", "fusedrl.kernels", "fusedrl.kernels.sampling"}
