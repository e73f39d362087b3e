"""The code_tests reward and the python tool, on real sandboxed runs."""
import pytest

from fusedrl.engine.sandbox import code_tests, extract_code, python

pytestmark = pytest.mark.integration


def test_extract_code_takes_the_last_fenced_block_or_the_whole_answer():
    answer = "First\n```python\nx = 1\n```\nthen\n```py\ndef f():\n    return 2\n```\n"
    assert extract_code(answer) == "def f():\n    return 2\n"
    assert extract_code("print(3)") == "print(3)"
    assert extract_code([{"role": "assistant", "content": "```\nprint(4)\n```"}]) == "print(4)\n"


def test_code_tests_scores_the_fraction_of_passing_cases():
    completions = ["```python\ndef add(a, b):\n    return a + b\n```",
                   "def add(a, b):\n    return a - b",
                   "import sys\nprint(sum(map(int, sys.stdin.read().split())))",
                   "while True:\n    pass"]
    tests = [["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
             ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
             [{"stdin": "1 2", "stdout": "3"}, {"stdin": "5 5", "stdout": "11"}],
             ["assert add(1, 1) == 2"]]
    scores = code_tests(prompts=["p"] * 4, completions=completions, tests=tests, timeout_s=1.0)
    assert scores == [1.0, 0.5, 0.5, 0.0]


def test_code_tests_refuses_a_row_without_its_column_or_a_bad_case():
    with pytest.raises(ValueError, match="tests="):
        code_tests(["p"], ["print(1)"])
    with pytest.raises(ValueError, match="row 0 has test case"):
        code_tests(["p"], ["print(1)"], tests=[[42]])
    with pytest.raises(ValueError, match="row 0 has test case 'assert f"):
        code_tests(["p"], ["print(1)"], tests=[["assert f(1) > 2"]])


def test_the_python_tool_returns_output_or_the_error_line():
    assert python("print(6 * 7)") == "42\n"
    assert python("1 / 0").strip().endswith("ZeroDivisionError: division by zero")
