"""Test setup shared by every test: the Triton interpreter on CPU-only machines, per-test seeds.

On a machine without CUDA the Triton kernels run in the interpreter on CPU tensors; the variable
must be set before triton decorates the kernels, hence before `kernels` is imported.
"""
import os
import pathlib
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton reads the variable when a kernel is defined: a module that sets it while the suite is
# collected makes every kernel defined after it an interpreted one, in every worker (on a GPU they
# then copy CUDA tensors to the host, break graph capture and refuse CPU tensors).
_INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET")

# pytest-xdist's workers share the machine's cores: each takes its share for torch's intra-op
# threads, and so do the processes it starts (OMP_NUM_THREADS). With torch's default of one thread
# per core, two workers on two cores would each run two, and a test of many small CPU ops pays an
# OpenMP barrier per op against the other worker's threads (a multi-turn rollout measured 8.4 s on
# 2 threads against 0.2 s on 1).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _THREADS = max(1, _CORES // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

import pytest  # noqa: E402

import interpreter_patching  # noqa: E402
from kernel_testing import DEVICE, FUSED_BACKENDS, TRAIN_DTYPE  # noqa: E402
from process_testing import starts_processes  # noqa: E402

interpreter_patching.install()  # where TRITON_INTERPRET=1: the same kernels, less patching


@pytest.fixture(params=FUSED_BACKENDS)
def fused_backend(request):
    """The fused backend a correctness test runs on: "triton", then "cuda" where it is built."""
    return request.param


@pytest.fixture(scope="session")
def device():
    """Where a device-agnostic test runs: CUDA when the machine has a GPU, else the CPU."""
    return torch.device(DEVICE)


@pytest.fixture(scope="session")
def train_dtype():
    """The parameter dtype of a default-precision training run on `device` (bf16 on CUDA, fp32 on CPU)."""
    return TRAIN_DTYPE


@pytest.fixture(autouse=True)
def _seed(request):
    """A fresh, reproducible seed per test (derived from its name), so inputs differ across tests."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads its options
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: only meaningful on a CUDA GPU (skipped without one); "
                                       "`pytest -m gpu tests` runs just these on a GPU machine")
    config.addinivalue_line("markers", "integration: starts other processes (torchrun ranks, the "
                                       "fusedrl command, scripts); set on each test that reaches a "
                                       "process starter (tests/process_testing.py); `pytest -m "
                                       "'not integration' tests` runs the rest")
    # The interpreter evaluates both sides of tl.where in numpy, so a masked-off 0 * inf warns.
    config.addinivalue_line("filterwarnings", "ignore:invalid value encountered:RuntimeWarning")
    # tests/bench runs each benchmark case once as a test; timings and their table are bench/'s job
    # (`--benchmark-enable` brings them back).
    if hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True


def pytest_collectreport(report):
    if os.environ.get("TRITON_INTERPRET") != _INTERPRET_AT_START:
        raise pytest.UsageError(
            f"{report.nodeid}: importing it changed TRITON_INTERPRET from {_INTERPRET_AT_START!r} to "
            f"{os.environ.get('TRITON_INTERPRET')!r}; set it only where torch.cuda.is_available() is False")


def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist's default `load`: each test handed out alone, as `load` does, except that
    a module's process-starting tests go to one worker together. Their module-scoped fixture
    (often a minute of torchrun ranks) then runs once: split over two workers it ran on each, and
    interleaved with other modules' tests it was torn down and run again."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ProcessModulesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            path = config.rootpath / module
            return module if path.suffix == ".py" and starts_processes(path, nodeid) else nodeid

    return ProcessModulesTogether(config, log)


@pytest.hookimpl(tryfirst=True)  # marked before `-m` selects on the marks
def pytest_collection_modifyitems(config, items):
    # Tests that start processes take 5-60 s each (an interpreter importing torch per process)
    # against well under a second for most others. pytest-xdist hands tests out in collection order,
    # so one of them collected late runs alone after the other worker has finished: put them first
    # (a stable sort: each module's tests stay together, in their order), and the short ones fill in.
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and starts_processes(pathlib.Path(module.__file__), item.nodeid):
            item.add_marker(pytest.mark.integration)
    items.sort(key=lambda item: "integration" in item.keywords, reverse=True)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
