"""The kernels' value-reading input checks switched off, as a GPU runs them, for the counters that
stand in for a GPU on the CPU (launches, traffic, host syncs): on CPU tensors the checks read
values for free and always run (kernels.dispatch.sync_checks_enabled), so a count with them on
would count ops and syncs a GPU never makes."""
from __future__ import annotations

import contextlib
import sys
from unittest import mock


@contextlib.contextmanager
def value_checks_as_on_gpu():
    """Within the block, every fusedrl.kernels module's sync_checks_enabled says False."""
    with contextlib.ExitStack() as stack:
        for name, module in list(sys.modules.items()):
            if name.startswith("fusedrl.kernels") and hasattr(module, "sync_checks_enabled"):
                stack.enter_context(mock.patch.object(module, "sync_checks_enabled", lambda x: False))
        yield
