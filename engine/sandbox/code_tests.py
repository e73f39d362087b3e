"""`code_tests`: a reward for code answers, the fraction of a row's test cases its program passes.

Use it as `reward_fn=fusedrl.engine.sandbox.code_tests:code_tests` on data with a `tests` column.
Each row's `tests` is a list of cases; a case is one of
- `"assert EXPR == VALUE"`: EXPR (`add(1, 2)`) evaluated after the answer's code, VALUE a Python
  literal (`3`);
- {"call": "add", "args": [1, 2], "expected": 3}: the answer's function called with those
  arguments;
- {"stdin": text, "stdout": text}: the answer run as a program on that input, passing when it
  exits 0 and its output equals the expected one (trailing whitespace of each line ignored).
The answer's code is its last ```python fenced block (or ``` block), else the whole answer.

Graded outside the box: each answer is one sandboxed run of grading_harness.py, which runs every
case in a fresh child interpreter and reports the value (or output) as data tagged with a nonce;
the expected values never enter the sandbox, and the comparison happens here, on plain values
rebuilt with ast.literal_eval. So an early exit, an always-equal object, reading or editing the
tests, or another answer's files scores what a wrong answer scores. Each case has `timeout_s`;
the whole batch has `batch_timeout_s`, past which the cases not yet reported score 0.
"""
from __future__ import annotations

import ast
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .isolation import REWARD_TIMEOUT_ENV
from .pool import SandboxPool

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
_HARNESS = Path(__file__).with_name("grading_harness.py").read_text(encoding="utf-8")
VALUE_CHARS = 1 << 16  # the longest value repr or program output compared, per case
BATCH_S = 120.0  # the default deadline of a batch


@dataclass(frozen=True)
class Case:
    """One test case: what the box is given (`expr` or `stdin`) and what the trainer expects."""
    given: dict
    expected: Any


def extract_code(answer: Any) -> str:
    """The program in an answer: a string, or a message list (its last assistant message)."""
    text = _answer_text(answer)
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def code_tests(prompts: Optional[Sequence] = None, completions: Optional[Sequence] = None, *,
               tests: Optional[Sequence[Sequence]] = None, timeout_s: float = 5.0,
               memory_mb: int = 512, batch_timeout_s: Optional[float] = None,
               **_columns) -> list[float]:
    """One score in [0, 1] per completion: the fraction of its row's `tests` that pass (a row with
    no tests scores 0). `prompts` is unused (the TRL reward signature). `batch_timeout_s` (None:
    BATCH_S, or less in a run: 80% of its reward.fn_timeout_s, so the batch ends before the
    reward call would fail the run)."""
    if batch_timeout_s is None:
        run_limit = float(os.environ.get(REWARD_TIMEOUT_ENV) or "inf")
        batch_timeout_s = min(BATCH_S, 0.8 * run_limit)
    if completions is None or tests is None:
        raise ValueError("code_tests needs the keywords completions= and tests= (a `tests` column "
                         "in the data, one list of cases per row)")
    if len(tests) != len(completions):
        raise ValueError(f"code_tests: {len(tests)} test lists for {len(completions)} completions")
    rows = [[parse_case(case, row) for case in cases or []] for row, cases in enumerate(tests)]
    nonce = secrets.token_hex(16)
    jobs = [json.dumps({"nonce": nonce, "code": extract_code(answer), "cases":
                        [case.given for case in cases], "case_timeout_s": timeout_s,
                        "value_chars": VALUE_CHARS})
            for answer, cases in zip(completions, rows)]
    answer_s = [len(cases) * (timeout_s + 1.0) + 5.0 for cases in rows]
    with SandboxPool() as pool:
        results = pool.map([_HARNESS] * len(jobs), jobs, timeout_s=answer_s, memory_mb=memory_mb,
                           output_limit=len(max(rows, key=len, default=[])) * 2 * VALUE_CHARS
                           + 4096, deadline=time.monotonic() + batch_timeout_s)
    return [_passed(cases, result.stdout if result else "", nonce) / len(cases) if cases else 0.0
            for cases, result in zip(rows, results)]


def parse_case(case, row: int) -> Case:
    """A row's test case as a Case, or a one-line error naming the row and the accepted forms."""
    if isinstance(case, str):
        parsed = _assert_equal(case)
        if parsed is not None:
            return parsed
    elif isinstance(case, dict) and isinstance(case.get("stdin", ""), str) \
            and isinstance(case.get("stdout"), str) and "call" not in case:
        return Case({"stdin": case.get("stdin", "")}, case["stdout"])
    elif isinstance(case, dict) and isinstance(case.get("call"), str) \
            and case["call"].isidentifier() and isinstance(case.get("args", []), list) \
            and "expected" in case:
        return Case({"expr": f"{case['call']}(*{case.get('args', [])!r})"}, case["expected"])
    raise ValueError(
        f"code_tests: row {row} has test case {str(case)[:80]!r}: expected 'assert EXPR == "
        'LITERAL\', {"call": name, "args": [...], "expected": value} or {"stdin": str, '
        '"stdout": str}')


def _assert_equal(text: str) -> Optional[Case]:
    """`assert EXPR == LITERAL` (either side literal) as a Case, else None."""
    try:
        body = ast.parse(text).body
    except SyntaxError:
        return None
    if len(body) != 1 or not isinstance(body[0], ast.Assert):
        return None
    test = body[0].test
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)):
        return None
    for expr, literal in ((test.left, test.comparators[0]), (test.comparators[0], test.left)):
        try:
            expected = ast.literal_eval(literal)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        return Case({"expr": ast.unparse(expr)}, expected)
    return None


def _passed(cases: list[Case], stdout: str, nonce: str) -> int:
    """How many cases the harness's report shows passing: the first report of each case counts;
    a case reported twice (a forgery) fails."""
    reports: dict[int, Optional[dict]] = {}
    for line in stdout.splitlines():
        tag, _, body = line.partition(" ")
        if tag != nonce:
            continue
        try:
            report = json.loads(body)
            at = report["case"]
        except (ValueError, KeyError, TypeError):
            continue
        reports[at] = None if at in reports else report
    return sum(_passes(case, reports.get(at)) for at, case in enumerate(cases))


def _passes(case: Case, report: Optional[dict]) -> bool:
    if not isinstance(report, dict):
        return False
    if "expr" in case.given:
        try:
            got = ast.literal_eval(report["value"])
        except Exception:  # noqa: BLE001 - not a plain value: the harness said what it could
            return False
        return got == case.expected
    return report.get("exit") == 0 and isinstance(report.get("stdout"), str) \
        and _lines(report["stdout"]) == _lines(case.expected)


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
