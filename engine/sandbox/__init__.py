"""Run the model's code safely: `run_python(code, *, stdin, timeout_s, memory_mb, files)` -> a
`SandboxResult`; `SandboxPool` runs many at a capped concurrency; `code_tests` is a reward over a
row's test cases and `python` a tool, both built on it; `detect().describe()` says what this
machine isolates (docs/agents.md)."""
from .code_tests import code_tests, extract_code
from .isolation import Isolation, SandboxRefused, allow_weak_isolation, detect
from .pool import SandboxPool
from .python_tool import python
from .runner import SandboxResult, run_python

__all__ = ["run_python", "SandboxResult", "SandboxPool", "Isolation", "SandboxRefused",
           "allow_weak_isolation", "detect", "code_tests",
           "extract_code", "python"]
