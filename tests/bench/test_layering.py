"""The layering rules of bench/layering.py hold on the tree, and the checker finds what it should."""
import ast
import pathlib

import layering


def test_the_tree_keeps_its_layers():
    found = layering.report()
    assert found["cycles"] == []
    assert found["private_kernel_imports"] == []
    assert found["upward_imports"] == []
    assert found["duck_typed_calls"] == []
    assert found["files_over_limit"] == []
    assert found["lines_over_limit"] == []


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


def test_public_kernel_packages_are_not_private():
    assert not layering.private_kernel_module("fusedrl.kernels")
    assert not layering.private_kernel_module("fusedrl.kernels.attention")
    assert layering.private_kernel_module("fusedrl.kernels.attention.paths")
    assert layering.private_kernel_module("fusedrl.kernels.rl.kl")


def test_duck_typed_layout_reads_are_found(tmp_path: pathlib.Path):
    path = tmp_path / "walk.py"
    path.write_text('def f(model):\n    tp = getattr(model, "tensor_parallel", None)\n'
                    '    return hasattr(model, "offloaded") or getattr(model, "config")\n')
    assert layering.duck_typed_calls("fusedrl.engine.model.walk", path) == [
        "fusedrl.engine.model.walk:2 getattr(..., 'tensor_parallel')",
        "fusedrl.engine.model.walk:3 hasattr(..., 'offloaded')"]


def test_upward_imports_match_whole_module_names():
    tp = "fusedrl.engine.parallel.tensor_parallel"
    assert layering.within(tp, tp) and layering.within(tp, "fusedrl.engine.parallel")
    assert not layering.within(tp + "_ops", tp)
    rules = dict.fromkeys(layering.FORBIDDEN)
    # The upward imports the parallel package replaced: the layout calling generation, training
    # calling the plan.
    assert ("fusedrl.engine.parallel", "fusedrl.engine.inference") in rules
    assert ("fusedrl.engine.train", "fusedrl.engine.plan") in rules
