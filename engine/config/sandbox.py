"""Config of the sandbox that runs the model's code (code_tests, the python tool). Torch-free."""
from __future__ import annotations

from dataclasses import dataclass

from .fields import check_fields, option


@dataclass
class SandboxConfig:
    allow_weak_isolation: bool = option(
        "run the model's code even where only a weak sandbox works on this machine (unshare or "
        "none: the host's files and unix sockets, its processes through /proc, and under none "
        "its network, are NOT isolated; no seccomp; docs/safety.md). Without it such code is "
        "refused in one line; bubblewrap is the strong sandbox", False)

    def __post_init__(self):
        check_fields(self, "sandbox.")
