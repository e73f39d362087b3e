"""The program code_tests runs inside the sandbox (as its main.py, standard library only): it runs
each test case of one answer in a fresh child interpreter and reports what the answer produced as
data, never whether it passed: the expected values stay with the trainer, which compares.

Its standard input is one JSON object: {"nonce", "code", "cases", "case_timeout_s",
"value_chars"}, a case being {"expr": Python expression} (evaluated after the answer's code, in
its namespace) or {"stdin": text} (the answer run as a program on that input). For each case it
prints one line to its standard output, `NONCE {"case": i, ...}`: "value" (the repr of the
expression's value, built only of None, bool, int, float, str, list, tuple, dict and set, exactly
those types), "stdout" and "exit" (a program's output and exit status), or "error". Once it has
read its input it makes itself non-dumpable, so the answer's processes (the same uid) cannot read
its memory or its descriptors through /proc; each child has no way to its standard output.
"""
import ctypes
import json
import os
import signal
import subprocess
import sys

_PR_SET_DUMPABLE = 4
# Runs the answer, then the case's expression; only the value's repr is written to the saved
# standard output (the answer's own prints go nowhere). Whatever the answer forges on that channel
# is a value it could have returned.
CHILD = r'''
import json, os, sys
job = json.loads(sys.stdin.read())
out = os.dup(1)
quiet = os.open(os.devnull, os.O_WRONLY)
os.dup2(quiet, 1)
sys.stdin = open(os.devnull)
PLAIN = (type(None), bool, int, float, str)
def plain(value, depth=0):
    kind = type(value)
    if depth > 50:
        raise TypeError("nested too deeply")
    if kind in PLAIN:
        return True
    if kind in (list, tuple, set):
        return all(plain(item, depth + 1) for item in value)
    if kind is dict:
        return all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in value.items())
    raise TypeError(f"a value of type {kind.__name__}: expected plain data")
space = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(job["code"], "answer.py", "exec"), space)
value = eval(compile(job["expr"], "<test case>", "eval"), space)
plain(value)
text = repr(value)
os.write(out, text.encode("utf-8", "replace") + b"\n")
'''


def main() -> None:
    job = json.loads(sys.stdin.read())
    ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    nonce, timeout = job["nonce"], float(job["case_timeout_s"])
    with open("answer.py", "w", encoding="utf-8") as answer:
        answer.write(job["code"])
    for at, case in enumerate(job["cases"]):
        if "expr" in case:
            given = json.dumps({"code": job["code"], "expr": case["expr"]})
            report = _run([sys.executable, "-I", "-B", "-c", CHILD], given, timeout)
            lines = report.get("stdout", "").splitlines()
            if report.get("exit") == 0 and len(lines) == 1:
                report = {"value": lines[0][:int(job["value_chars"])]}
            elif "error" not in report:
                report = {"error": f"no value (exit {report.get('exit')})"}
        else:
            report = _run([sys.executable, "-I", "-B", "answer.py"], case["stdin"], timeout)
            report["stdout"] = report.get("stdout", "")[:int(job["value_chars"])]
        sys.stdout.write(f"{nonce} {json.dumps({'case': at, **report})}\n")
        sys.stdout.flush()


def _run(argv: list, stdin: str, timeout: float) -> dict:
    """One child in a session of its own, killed with its group at `timeout` seconds."""
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = child.communicate(stdin.encode("utf-8"), timeout=timeout)
        return {"stdout": out.decode("utf-8", "replace"), "exit": child.returncode}
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except OSError:
            pass
        child.wait()


if __name__ == "__main__":
    main()
