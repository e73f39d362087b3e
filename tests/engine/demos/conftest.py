"""The demos end to end as `fusedrl demo` runs them on a CPU."""
import pytest


@pytest.fixture
def cpu_user_backend(monkeypatch):
    """PyTorch's paths, as `fusedrl demo` takes them on a CPU without TRITON_INTERPRET: a demo test
    proves the demo's wiring (its stages, table and files). The fused kernels the stages call are
    checked against their references by tests/kernels, and the stages under the interpreter by
    tests/engine/stages; here the interpreter would take most of a short demo's time."""
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
