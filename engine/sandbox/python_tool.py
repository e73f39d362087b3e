"""`python`: a tool the model can call to run Python code in the sandbox (for rollout.tools)."""
from __future__ import annotations

from .runner import run_python

# What a tool result may add to the conversation: the model reads it back as prompt tokens.
RESULT_CHARS = 2000


def python(code: str) -> str:
    """Run a Python program in a sandbox and return what it printed.

    Args:
        code: The complete Python program to run; print the values you need.
    """
    result = run_python(code, timeout_s=5.0, memory_mb=512, output_limit=RESULT_CHARS * 4)
    text = result.stdout
    if result.timed_out:
        text += "\n[timed out after 5 s]"
    elif result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        text += "\n" + (lines[-1] if lines else f"[exit code {result.returncode}]")
    return text[:RESULT_CHARS]
