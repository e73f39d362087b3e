"""Count what Triton kernels actually load and store, inside them: under TRITON_INTERPRET=1 the
interpreter's load / store / atomic builders are wrapped, so every active lane's bytes are counted
(a re-read counts again), per kernel, with the launches. The dispatch-level counter (traffic_count)
sees a custom op's arguments and results once; this one sees the passes a kernel makes.

    with KernelTraffic() as t:
        sample_triton(...)
    t.loaded["_chunk_stats_kernel"], t.stored[...], t.launches[...]
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
from triton.runtime import interpreter

_B = interpreter.InterpreterBuilder


def _itemsize(ptrs) -> int:
    return np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize


def _lanes(ptrs, mask) -> int:
    if mask is None:
        return int(np.size(ptrs.data))
    return int(np.count_nonzero(np.broadcast_to(mask.data, np.shape(ptrs.data))))


class KernelTraffic:
    """Within `with KernelTraffic() as t:` (interpreter only): t.loaded / t.stored [kernel name] = bytes,
    t.launches [kernel name] = grids launched. Atomics count as a load and a store of each active lane."""

    def __init__(self):
        self.loaded = defaultdict(int)
        self.stored = defaultdict(int)
        self.launches = defaultdict(int)
        self.kernel = "?"
        self._saved = {}

    def __enter__(self):
        counter = self
        # (the unmasked builders call these with an all-true mask)
        wrap = {
            "create_masked_load": lambda f: lambda b, ptr, mask, *a: counter._add("loaded", ptr, mask)
            or f(b, ptr, mask, *a),
            "create_masked_store": lambda f: lambda b, ptr, val, mask, *a: counter._add("stored", ptr, mask)
            or f(b, ptr, val, mask, *a),
            "create_atomic_rmw": lambda f: lambda b, op, ptr, val, mask, *a: counter._atomic(ptr, mask)
            or f(b, op, ptr, val, mask, *a),
        }
        for name, wrapper in wrap.items():
            self._saved[(_B, name)] = getattr(_B, name)
            setattr(_B, name, wrapper(getattr(_B, name)))
        grid_call = interpreter.GridExecutor.__call__

        def launched(executor, *args, **kwargs):
            counter.kernel = executor.fn.__name__
            counter.launches[counter.kernel] += 1
            return grid_call(executor, *args, **kwargs)
        self._saved[(interpreter.GridExecutor, "__call__")] = grid_call
        interpreter.GridExecutor.__call__ = launched
        return self

    def __exit__(self, *exc):
        for (owner, name), fn in self._saved.items():
            setattr(owner, name, fn)
        return False

    def _add(self, kind, ptrs, mask):
        getattr(self, kind)[self.kernel] += _lanes(ptrs, mask) * _itemsize(ptrs)

    def _atomic(self, ptrs, mask):
        self._add("loaded", ptrs, mask)
        self._add("stored", ptrs, mask)

    def total_loaded(self) -> int:
        return sum(self.loaded.values())
