"""The integration mark is per test (tests/process_testing.py): a test reaching a process starter
through its fixtures or the module's helpers is marked, its module's other tests are not."""
from process_testing import starts_processes

MODULE = '''
import subprocess as sp
import pytest
from dist_testing import check, rank_threads, torchrun
from cli_testing import cli_error, run_fusedrl


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("r"))


def launch(root):
    check(torchrun("sft", {}, root))


def test_reads_the_runs(runs):
    assert runs


def test_in_process(capsys):
    with rank_threads():
        assert cli_error(["sft"], capsys)


def test_the_shell():
    run_fusedrl("info")


class TestGroup:
    def test_alias(self):
        sp.run(["true"])

    def test_pure(self):
        assert 1
'''


def test_each_test_is_marked_by_what_it_reaches(tmp_path):
    path = tmp_path / "test_example.py"
    path.write_text(MODULE)
    marked = {name: starts_processes(path, f"test_example.py::{name}[a-b]") for name in
              ("test_reads_the_runs", "test_in_process", "test_the_shell", "TestGroup::test_alias",
               "TestGroup::test_pure")}
    assert marked == {"test_reads_the_runs": True, "test_in_process": False, "test_the_shell": True,
                      "TestGroup::test_alias": True, "TestGroup::test_pure": False}


def test_a_starter_read_as_its_module_s_attribute_marks_only_its_callers(tmp_path):
    path = tmp_path / "test_attribute.py"
    path.write_text("import static_gpu\n\n\ndef test_check():\n    static_gpu.main([])\n\n\n"
                    "def test_rows():\n    static_gpu.problems({})\n")
    assert starts_processes(path, "test_attribute.py::test_check")
    assert not starts_processes(path, "test_attribute.py::test_rows")


def test_several_stage_runs_in_one_launch_start_processes(tmp_path):
    path = tmp_path / "test_launch.py"
    path.write_text("import dist_testing\n\n\ndef test_runs(tmp_path):\n"
                    "    dist_testing.torchrun_runs([dist_testing.stage_run('sft', {})], tmp_path)\n\n\n"
                    "def test_step():\n    dist_testing.stage_run('sft', {})\n")
    assert starts_processes(path, "test_launch.py::test_runs")
    assert not starts_processes(path, "test_launch.py::test_step")
