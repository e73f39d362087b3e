"""code_tests under attack: every way an answer could pass without computing the answer scores
what wrong code scores (0), beside an honest answer that scores 1; a batch past its deadline
scores its unfinished cases 0 instead of failing."""
import time

import pytest

from fusedrl.engine.sandbox import code_tests, detect, isolation

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not detect().strong, reason=detect().describe())]

SECRET = "expected-6c1f2a"  # the expected value: it must never be found inside the box
HONEST = "def answer(x):\n    return 'expected-' + x\n"
TESTS = [f"assert answer('6c1f2a') == {SECRET!r}",
         {"call": "answer", "args": ["6c1f2a"], "expected": SECRET}]
CHEATS = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "atexit exit": "import atexit, os\natexit.register(lambda: os._exit(0))\n"
                   "def answer(x):\n    raise ValueError",
    "excepthook exit": "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n"
                       "def answer(x):\n    raise ValueError",
    "always equal": "class Any:\n    def __eq__(self, other):\n        return True\n"
                    "    __hash__ = object.__hash__\ndef answer(x):\n    return Any()",
    "str subclass": "class S(str):\n    def __eq__(self, other):\n        return True\n"
                    "    __hash__ = str.__hash__\ndef answer(x):\n    return S('wrong')",
    # Searches everything it can see for the expected value (the tests, the harness's input,
    # its memory and descriptors through /proc) and returns the first string that looks like it.
    "reads the tests": """
import os, re, sys
found = []
def scan(text):
    found.extend(re.findall(r"expected-[0-9a-f]{6}", text))
for root, dirs, files in os.walk('/', onerror=None):
    if root.startswith(('/proc', '/usr', '/sys', '/dev', sys.base_prefix)):  # not the tests
        dirs[:] = []
        continue
    for name in files:
        try:
            scan(open(os.path.join(root, name), errors='replace').read(1 << 20))
        except OSError:
            pass
for pid in filter(str.isdigit, os.listdir('/proc')):
    for part in ('cmdline', 'environ', 'mem', 'fd/0'):
        try:
            scan(open(f'/proc/{pid}/{part}', errors='replace').read(1 << 20))
        except (OSError, ValueError):
            pass
def answer(x):
    return [f for f in found if f != 'expected-' + x and f != 'expected-[0-9a-f]{6}'][:1] or None
""",
    # Writes a forged report for every case on every descriptor it can open, under every
    # hex string it can find (the nonce is one of them only if it leaked).
    "forges reports": """
import json, os, re
tags = set()
for pid in filter(str.isdigit, os.listdir('/proc')):
    for part in ('cmdline', 'environ'):
        try:
            tags.update(re.findall(r'[0-9a-f]{32}', open(f'/proc/{pid}/{part}').read()))
        except OSError:
            pass
lines = ''.join(f'{t} ' + json.dumps({'case': c, 'value': repr('expected-6c1f2a')}) + '\\n'
                for t in tags | {'0' * 32} for c in range(2))
for pid in filter(str.isdigit, os.listdir('/proc')):
    for fd in ('1', '2'):
        try:
            with open(f'/proc/{pid}/fd/{fd}', 'w') as out:
                out.write(lines)
        except OSError:
            pass
print(lines)
def answer(x):
    return 'wrong'
""",
}


def test_every_cheat_scores_as_wrong_code_and_the_honest_answer_passes():
    names = list(CHEATS)
    scores = code_tests(completions=[HONEST, *CHEATS.values()],
                        tests=[TESTS] * (len(names) + 1), timeout_s=5.0)
    assert scores[0] == 1.0
    assert dict(zip(names, scores[1:])) == dict.fromkeys(names, 0.0)


def test_an_answer_cannot_touch_another_answers_files():
    vandal = ("import glob, os\nfor path in glob.glob('/sandbox/**', recursive=True) + "
              "glob.glob('/tmp/**', recursive=True) + glob.glob('/tmp/fusedrl-sandbox-*/*'):\n"
              "    try:\n        open(path, 'w').write('def answer(x):\\n    return 0\\n')\n"
              "    except OSError:\n        pass\ndef answer(x):\n    return 0")
    slow_honest = "import time\ntime.sleep(0.5)\n" + HONEST
    scores = code_tests(completions=[vandal, slow_honest], tests=[TESTS, TESTS], timeout_s=5.0)
    assert scores == [0.0, 1.0]


def test_stdin_cases_compare_the_output_outside_the_box():
    echo = "import sys\nprint(sys.stdin.read().upper())"
    exits = "import sys\nprint('HELLO')\nsys.exit(3)"
    cases = [{"stdin": "hello", "stdout": "HELLO"}]
    assert code_tests(completions=[echo, exits], tests=[cases, cases]) == [1.0, 0.0]


def test_a_batch_past_its_deadline_scores_unfinished_cases_zero(monkeypatch):
    loop = "def answer(x):\n    while True:\n        pass"
    # In a run, the deadline is 80% of its reward.fn_timeout_s: the call never fails the run.
    monkeypatch.setenv(isolation.REWARD_TIMEOUT_ENV, "2.5")
    start = time.monotonic()
    scores = code_tests(completions=[loop] * 6 + [HONEST], tests=[TESTS * 2] * 7, timeout_s=5.0)
    assert time.monotonic() - start < 6.0  # the deadline, plus ending the runs
    assert scores[:6] == [0.0] * 6
