"""The TRL these integrations are written against, checked before they import it: under an older
one (the test extra's trl 0.29.1, bench_ppo's PPO peer) their imports fail on names TRL 1.x added,
an ImportError that says nothing of why."""
from __future__ import annotations

MINIMUM = "1.16"


def require_trl(module: str) -> None:
    """Raise ImportError in one line naming `module`, the installed trl and the one it needs,
    unless trl >= MINIMUM is importable."""
    import trl
    from packaging.version import Version

    if Version(trl.__version__) < Version(MINIMUM):
        raise ImportError(f"{module} needs trl >= {MINIMUM} (pip install 'fusedrl[trl]'), found "
                          f"trl {trl.__version__} at {trl.__file__}")
