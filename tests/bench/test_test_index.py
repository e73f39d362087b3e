"""tests/README.md, the index of which test files import each library module, is current
(bench/test_index.py), and a re-exported name counts for the module that defines it."""
import pathlib

import test_index


def test_the_index_is_current():
    assert test_index.INDEX.read_text(encoding="utf-8") == test_index.index(), \
        "tests/README.md is stale: run python bench/test_index.py"


def test_a_reexported_name_counts_for_its_module(tmp_path: pathlib.Path):
    known = test_index.layering.modules()
    exported = test_index.reexports(known)
    test = tmp_path / "test_x.py"
    test.write_text("from fusedrl.kernels import token_logprobs\n"
                    "from fusedrl.engine.config import io\nimport fusedrl.engine.cli\n")
    assert test_index.modules_imported(test, known, exported) == {
        "fusedrl.kernels.rl.logprobs", "fusedrl.engine.config.io", "fusedrl.engine.cli"}
