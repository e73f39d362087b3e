"""Shared by the batch-invariant mode's tests."""
import pytest
import torch

from kernel_testing import DEVICE


@pytest.fixture(autouse=True)
def one_thread():
    """Run the test on one intra-op thread: the mode's many small elementwise ops each pay an OpenMP
    barrier with two, which on a shared 2-core runner costs ~10x the ops themselves. Results do not
    depend on it (test_invariant_ops checks 1 against 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randn(*shape, dtype=torch.float32, seed=0):
    """Seeded normal values on the tests' device (CUDA when there is one), in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)
