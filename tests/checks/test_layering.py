"""The layering rules of tests/checks/layering.py hold on the tree, and the checker finds what it should."""
import ast
import pathlib

import layering


def test_the_tree_keeps_its_layers():
    found = layering.report()
    assert found["cycles"] == []
    assert found["package_cycles"] == []
    assert found["top_level_cycles"] == []
    assert found["layer_order"] == []
    assert found["private_kernel_imports"] == []
    assert found["upward_imports"] == []
    assert found["duck_typed_calls"] == []
    assert found["stage_section_reads"] == []
    assert found["files_over_limit"] == []
    assert found["lines_over_limit"] == []


def test_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert layering.cycles(graph) == [["a", "b", "c"]]
    assert layering.cycles({"a": {"b"}, "b": set()}) == []


def test_package_cycles_count_packages_and_leave_loose_modules_apart(tmp_path: pathlib.Path):
    (tmp_path / "__init__.py").write_text("")
    known = {name: tmp_path / ("__init__.py" if name.endswith("pkg") else "m.py") for name in (
        "fusedrl.engine", "fusedrl.engine.errors", "fusedrl.engine.api", "fusedrl.engine.apkg",
        "fusedrl.engine.apkg.x", "fusedrl.engine.bpkg", "fusedrl.engine.bpkg.y",
        "fusedrl.engine.bpkg.z")}
    known["fusedrl.engine"] = tmp_path / "__init__.py"
    assert layering.package_of("fusedrl.engine.apkg.x", known) == "fusedrl.engine.apkg"
    assert layering.package_of("fusedrl.engine.apkg", known) == "fusedrl.engine.apkg"
    assert layering.package_of("fusedrl.engine.errors", known) == "fusedrl.engine.errors"
    # x -> y and z -> x: no module cycle, but apkg and bpkg import each other.
    graph = {"fusedrl.engine.apkg.x": {"fusedrl.engine.bpkg.y", "fusedrl.engine.errors"},
             "fusedrl.engine.bpkg.y": {"fusedrl.engine.errors"},
             "fusedrl.engine.bpkg.z": {"fusedrl.engine.apkg.x"},
             "fusedrl.engine.api": {"fusedrl.engine.apkg.x", "fusedrl.engine.bpkg.z"},
             "fusedrl.engine.errors": set(), "fusedrl.engine.apkg": set(),
             "fusedrl.engine.bpkg": set(), "fusedrl.engine": set()}
    assert layering.cycles(graph) == []
    packages = layering.package_graph(graph, known)
    assert layering.cycles(packages) == [["fusedrl.engine.apkg", "fusedrl.engine.bpkg"]]
    # The loose modules above and below (api imports both, both import errors) close no loop.
    del graph["fusedrl.engine.bpkg.z"]
    assert layering.cycles(layering.package_graph(graph, known)) == []


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


def test_stage_section_reads_below_the_stages_are_found(tmp_path: pathlib.Path):
    path = tmp_path / "m.py"
    path.write_text('def f(cfg):\n    teacher = getattr(cfg, "teacher", None)\n'
                    '    return cfg.rollout.exact or cfg.train.tensor_parallel\n')
    assert layering.stage_section_reads("fusedrl.engine.parallel.m", path) == [
        "fusedrl.engine.parallel.m:2 getattr(..., 'teacher')", "fusedrl.engine.parallel.m:3 .rollout"]
    # the plan sizes a PPO config's rollout: only its duck-typed reads count
    assert layering.stage_section_reads("fusedrl.engine.plan.m", path) == [
        "fusedrl.engine.plan.m:2 getattr(..., 'teacher')"]
    assert layering.stage_section_reads("fusedrl.engine.stages.ppo.m", path) == []


def test_upward_imports_match_whole_module_names():
    tp = "fusedrl.engine.parallel.tensor_parallel"
    assert layering.within(tp, tp) and layering.within(tp, "fusedrl.engine.parallel")
    assert not layering.within(tp + "_ops", tp)
    order = layering.ENGINE_LAYERS.index
    # The layout below what runs it, training below the plan, the model below the layout, the
    # sandbox (the trainer's worker processes) below the agents and the stages.
    assert order("parallel") < order("inference") and order("train") < order("plan")
    assert order("model") < order("parallel") and order("sandbox") < order("agents") < order("stages")
    rules = dict.fromkeys(layering.FORBIDDEN)
    assert ("fusedrl.kernels.reference", "fusedrl.kernels.rl") in rules
    assert ("fusedrl.engine.inference", "fusedrl.engine.config") in rules


def test_top_level_packages_count_whole_and_keep_their_order():
    # An environment worker borrowing a stage's helper while the stage drives environments: no
    # module cycle and no cycle between stages.rewards and agents, but a loop between the engine's
    # top-level packages, and an import up the order.
    graph = {"fusedrl.engine.agents.env_worker": {"fusedrl.engine.stages.rewards.workers",
                                                  "fusedrl.engine.errors"},
             "fusedrl.engine.stages.rewards.workers": {"fusedrl.engine.errors"},
             "fusedrl.engine.stages.ppo.trainer": {"fusedrl.engine.agents.rollout"},
             "fusedrl.engine.agents.rollout": set(), "fusedrl.engine.errors": set(),
             "fusedrl.engine.gadgets.x": {"fusedrl.engine.errors"}, "fusedrl.kernels.rl": set()}
    assert layering.cycles(graph) == []
    assert layering.cycles(layering.top_level_graph(graph)) == [["agents", "stages"]]
    assert layering.layer_order_breaks(graph) == [
        "agents -> stages (fusedrl.engine.agents.env_worker -> fusedrl.engine.stages.rewards.workers)",
        "unplaced: gadgets"]
    del graph["fusedrl.engine.agents.env_worker"], graph["fusedrl.engine.gadgets.x"]
    assert layering.cycles(layering.top_level_graph(graph)) == []
    assert layering.layer_order_breaks(graph) == []
