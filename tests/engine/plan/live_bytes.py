"""Peak bytes of the activations of some code, on any device (the CPU's allocator keeps no
statistics): a TorchDispatchMode sees every tensor an op creates, forward and backward alike, and
tracks the storages behind them through weak references until they are freed. Activations are the
storages freed before the code ends: what it returns and keeps (the parameters' gradients, the
outputs) is not counted, nor what existed before (weights, inputs)."""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Use as `with LiveBytes() as live: ...`; then `live.peak`: the most bytes of activations (see
    the module docstring) alive at once."""

    def __init__(self):
        super().__init__()
        # storage key -> (weak reference, bytes, allocation number)
        self.alive: dict[int, tuple[StorageWeakRef, int, int]] = {}
        # (allocation number, +bytes when created / -bytes when freed), in order
        self.events: list[tuple[int, int]] = []
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._collect()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self.alive and storage.nbytes():
                    allocation = len(self.events)
                    ref = StorageWeakRef(storage)
                    self.alive[storage._cdata] = (ref, storage.nbytes(), allocation)
                    self.events.append((len(self.events), storage.nbytes()))
        return out

    def _collect(self):
        """Record the storages freed since the last op."""
        for key in [k for k, (ref, _, _) in self.alive.items() if ref.expired()]:
            _, nbytes, allocation = self.alive.pop(key)
            self.events.append((allocation, -nbytes))

    def __exit__(self, *exc):
        self._collect()
        kept = {allocation for _, _, allocation in self.alive.values()}
        live = 0
        for allocation, delta in self.events:
            if allocation not in kept:
                live += delta
                self.peak = max(self.peak, live)
        return super().__exit__(*exc)
