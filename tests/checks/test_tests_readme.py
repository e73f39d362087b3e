"""tests/README.md, the index of which test files import each library module, is current
(tests/checks/tests_readme.py), and a re-exported name counts for the module that defines it."""
import pathlib

import tests_readme


def test_the_index_is_current():
    assert tests_readme.INDEX.read_text(encoding="utf-8") == tests_readme.index(), \
        "tests/README.md is stale: run python tests/checks/tests_readme.py"


def test_a_reexported_name_counts_for_its_module(tmp_path: pathlib.Path):
    known = tests_readme.layering.modules()
    exported = tests_readme.reexports(known)
    test = tmp_path / "test_x.py"
    test.write_text("from fusedrl.kernels import token_logprobs\n"
                    "from fusedrl.engine.config import io\nimport fusedrl.engine.cli\n")
    assert tests_readme.modules_imported(test, known, exported) == {
        "fusedrl.kernels.rl.logprobs", "fusedrl.engine.config.io", "fusedrl.engine.cli"}
