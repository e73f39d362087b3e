"""Test setup shared by every test: the Triton interpreter on CPU-only machines, per-test seeds.

On a machine without CUDA the Triton kernels run in the interpreter on CPU tensors; the variable
must be set before triton decorates the kernels, hence before `kernels` is imported.
"""
import inspect
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernel_testing import DEVICE, FUSED_BACKENDS, TRAIN_DTYPE  # noqa: E402


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
                                       "fusedrl command, scripts); set on every test of a module "
                                       "holding a process starter; `pytest -m 'not integration' "
                                       "tests` runs the rest")
    # The interpreter evaluates both sides of tl.where in numpy, so a masked-off 0 * inf warns.
    config.addinivalue_line("filterwarnings", "ignore:invalid value encountered:RuntimeWarning")
    # tests/bench runs each benchmark case once as a test; timings and their table are bench/'s job
    # (`--benchmark-enable` brings them back).
    if hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True


# What a test module uses to start another process: torchrun ranks (dist_testing), a `fusedrl`
# command (cli_testing), a benchmark or static-check script, spawned ranks.
PROCESS_STARTERS = {"subprocess", "multiprocessing", "torch.multiprocessing", "dist_testing", "cli_testing",
                    "static_gpu"}


def _starts_processes(module, seen: dict) -> bool:
    """Whether `module` (a test module, or None) holds a process starter among its globals."""
    if module not in seen:
        seen[module] = module is not None and any(
            (value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)) in PROCESS_STARTERS
            for value in vars(module).values())
    return seen[module]


@pytest.hookimpl(tryfirst=True)  # marked before `-m` selects on the marks
def pytest_collection_modifyitems(config, items):
    # Tests that start processes take 5-60 s each (an interpreter importing torch per process)
    # against well under a second for most others. pytest-xdist hands tests out in collection order,
    # so one of them collected late runs alone after the other worker has finished: put them first
    # (a stable sort: each module's tests stay together, in their order), and the short ones fill in.
    # Their modules' fixtures (a module-scoped run of torchrun ranks, often a minute) run once per
    # worker that gets one of the module's tests: under `--dist loadgroup` a module's process tests
    # are one group, on one worker, and the fixture runs once.
    seen = {}
    for item in items:
        if _starts_processes(getattr(item, "module", None), seen):
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    items.sort(key=lambda item: "integration" in item.keywords, reverse=True)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
