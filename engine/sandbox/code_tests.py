"""`code_tests`: a reward for code answers, the fraction of a row's test cases its program passes.

Use it as `reward_fn=fusedrl.engine.sandbox.code_tests:code_tests` on data with a `tests` column.
Each row's `tests` is a list of cases; a case is either
- a string: Python statements (usually `assert ...`) run after the answer's code in the same
  program, passing when the program exits 0; or
- an object {"stdin": text, "stdout": text}: the answer's program run with that input, passing
  when its output equals the expected one (trailing whitespace of each line ignored).
The answer's code is its last ```python fenced block (or ``` block), else the whole answer. Every
case is one sandboxed run (runner.run_python) under `timeout_s` and `memory_mb`.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from .pool import SandboxPool

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(answer: Any) -> str:
    """The program in an answer: a string, or a message list (its last assistant message)."""
    text = _answer_text(answer)
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def code_tests(prompts: Optional[Sequence] = None, completions: Optional[Sequence] = None, *,
               tests: Optional[Sequence[Sequence]] = None, timeout_s: float = 5.0,
               memory_mb: int = 512, **_columns) -> list[float]:
    """One score in [0, 1] per completion: the fraction of its row's `tests` that pass (a row with
    no tests scores 0). `prompts` is unused (the TRL reward signature)."""
    if completions is None or tests is None:
        raise ValueError("code_tests needs the keywords completions= and tests= (a `tests` column "
                         "in the data, one list of cases per row)")
    if len(tests) != len(completions):
        raise ValueError(f"code_tests: {len(tests)} test lists for {len(completions)} completions")
    runs, owners = [], []
    for row, (answer, cases) in enumerate(zip(completions, tests)):
        code = extract_code(answer)
        for case in cases or []:
            runs.append(_case_run(code, case, row))
            owners.append((row, case))
    with SandboxPool() as pool:
        results = pool.map([program for program, _ in runs], [stdin for _, stdin in runs],
                           timeout_s=timeout_s, memory_mb=memory_mb)
    passed = [0] * len(completions)
    for (row, case), result in zip(owners, results):
        passed[row] += _passes(case, result)
    return [passed[row] / len(cases) if cases else 0.0 for row, cases in enumerate(tests)]


def _case_run(code: str, case, row: int) -> tuple[str, Optional[str]]:
    """(program, stdin) of one test case."""
    if isinstance(case, str):
        return f"{code}\n\n{case}\n", None
    if isinstance(case, dict) and isinstance(case.get("stdin", ""), str) \
            and isinstance(case.get("stdout"), str):
        return code, case.get("stdin", "")
    raise ValueError(
        f"code_tests: row {row} has test case {str(case)[:80]!r}: expected a string of "
        'statements or {"stdin": str, "stdout": str}')


def _passes(case, result) -> bool:
    if not result.ok:
        return False
    if isinstance(case, str):
        return True
    return _lines(result.stdout) == _lines(case["stdout"])


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().splitlines()]


def _answer_text(answer: Any) -> str:
    if isinstance(answer, str):
        return answer
    if isinstance(answer, (list, tuple)):  # a conversational completion: its assistant messages
        said = [m.get("content") or "" for m in answer if isinstance(m, dict)
                and m.get("role") == "assistant"]
        if said:
            return said[-1]
    raise ValueError(f"code_tests: completion {str(answer)[:80]!r}: expected a string or a list of "
                     "messages with an assistant message")
