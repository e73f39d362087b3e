"""Count the kernels an op launches and the host syncs it makes, on the CPU.

A launch is: a Triton kernel launch (JITFunction.run, or the interpreter's InterpretedFunction.run),
an aten op that runs a kernel (everything but allocations and views, traffic_count.FREE), or a
custom op (one, whatever it does inside: what runs inside is not counted again, nor are the
tensor copies the Triton interpreter makes around a launch). Host syncs are
counted as in traffic_count (item / bool / nonzero ... and tolist / cpu / numpy).

    with LaunchCounter() as counter:
        loss.backward()
    counter.launches, counter.names, counter.syncs
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedrl.bench.traffic_count import FREE, PATCHED_SYNCS, SYNC_OPS

try:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    TRITON_LAUNCHERS = (JITFunction, InterpretedFunction)
except ImportError:
    TRITON_LAUNCHERS = ()


class LaunchCounter(TorchDispatchMode):
    """Within `with LaunchCounter() as c:`, c.launches (int), c.names (what ran, in order),
    c.syncs[kind] = n."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.syncs = defaultdict(int)
        self._inside_op = 0
        self._stack = contextlib.ExitStack()

    @property
    def launches(self) -> int:
        return len(self.names)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.syncs[SYNC_OPS[func]] += 1
        if self._inside_op or func in FREE or getattr(func, "is_view", False):
            return func(*args, **kwargs)
        self.names.append(func.name())
        custom = func.namespace not in ("aten", "prims")
        self._inside_op += custom
        try:
            return func(*args, **kwargs)
        finally:
            self._inside_op -= custom

    def __enter__(self):
        for launcher in TRITON_LAUNCHERS:
            self._stack.enter_context(_patched(launcher, "run", self._counting_run))
        for name in PATCHED_SYNCS:
            self._stack.enter_context(_patched(torch.Tensor, name, self._counting_sync(name)))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()

    def _counting_run(self, original):
        def run(kernel, *args, **kwargs):
            if not self._inside_op and not kwargs.get("warmup", False):
                self.names.append(f"triton:{getattr(kernel, '__name__', None) or kernel.fn.__name__}")
            self._inside_op += 1  # the interpreter's own tensor copies are not launches
            try:
                return original(kernel, *args, **kwargs)
            finally:
                self._inside_op -= 1
        return run

    def _counting_sync(self, name):
        def wrap(original):
            def call(tensor, *args, **kwargs):
                self.syncs[name] += 1
                return original(tensor, *args, **kwargs)
            return call
        return wrap


@contextlib.contextmanager
def _patched(owner, attribute: str, make):
    """owner.attribute replaced by make(original) inside the block."""
    original = getattr(owner, attribute)
    setattr(owner, attribute, make(original))
    try:
        yield
    finally:
        setattr(owner, attribute, original)
