"""Where no strong sandbox works, the sandbox's behaviour tests run under the weak mode, asked for
(test_sandbox_attacks.py and test_code_tests_cheats.py skip there: they test the strong one)."""
import pytest

from fusedrl.engine.sandbox import detect, isolation


@pytest.fixture(autouse=True)
def weak_mode_asked_for_without_bubblewrap(monkeypatch):
    if not detect().strong:
        monkeypatch.setenv(isolation.ALLOW_WEAK_ENV, "1")
    yield
