"""Record every Triton kernel launch of a workload run under TRITON_INTERPRET=1 on the CPU.

A launch is reduced to what the JIT specializes on, so that distinct records are distinct
compilations: per tensor argument its dtype and whether its address is 16-byte aligned; per int
its value class (1, a multiple of 16, needs 64 bits, other) with one representative value, or only
whether it needs 64 bits for an int the kernel declares `do_not_specialize` (its other classes never
reach the compiler: without this, a kernel launched on 90 and 112 rows counted, and was prebuilt,
twice); per float a placeholder; constexprs and launch options exactly. `compile.py` rebuilds
arguments from this and lets Triton's own binder specialize them.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TOOLS = Path(__file__).resolve().parents[1]  # tests/tools: gpucheck's parent, put on a child's path


def _describe(value):
    if isinstance(value, torch.Tensor):
        # The address modulo 16 decides tt.divisibility; a CPU tensor's offset into its buffer is the
        # one a CUDA tensor of the same view would have (both allocators align to >= 64 bytes).
        return {"tensor": str(value.dtype).removeprefix("torch."), "misalign": value.data_ptr() % 16}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return {"const": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, float):
        return {"float": value}
    raise TypeError(f"unrecordable kernel argument {type(value).__name__}")


def _int_class(value: int) -> tuple:
    return (value == 1, value % 16 == 0, not -2 ** 31 <= value < 2 ** 31)


def specialization_key(kernel: str, args: list, options: dict, unspecialized=()) -> str:
    """Launches with equal keys compile to one binary: ints by class (those named in
    `unspecialized`, the kernel's do_not_specialize, by their width alone), floats by nothing."""
    def reduce(name, d):
        if "int" in d:
            size = _int_class(d["int"])
            return ("int",) + ((False, False, size[2]) if name in unspecialized else size)
        if "float" in d:
            return ("float",)
        return tuple(sorted(d.items()))
    return json.dumps([kernel, [reduce(n, d) for n, d in args], sorted(options.items())],
                      default=str)


# Constexprs that only choose the interpreter's stand-in code (CPU tensors): recorded with the value a
# CUDA launch passes, so the GPU's code is what gets compiled.
GPU_CONSTEXPRS = {"INTERPRETED": False}


class _Unexecuted:
    """Whether a recording runs the launches it records (see `unexecuted`)."""
    active = False


def _gemm_shapes():
    aten = torch.ops.aten
    return {aten.linear.default: lambda x, w, bias=None: (*x.shape[:-1], w.shape[0]),
            aten.mm.default: lambda a, b: (a.shape[0], b.shape[1]),
            aten.addmm.default: lambda bias, a, b, **kwargs: (a.shape[0], b.shape[1]),
            aten.bmm.default: lambda a, b: (a.shape[0], a.shape[1], b.shape[2])}


class _ZeroGemms(TorchDispatchMode):
    """Within the block torch's matrix products (cuBLAS's on a GPU: they launch nothing to record)
    return zeros of their shape and dtype at once: this CPU multiplies bf16 at about 1 GFLOP/s,
    and a bf16 model's startup at Qwen2.5-0.5B's shape would spend minutes in them. Every value
    downstream is then that of a zero model (zero norms, uniform logits: greedy draws token 0),
    finite, and what it launches is specialized as with real weights."""

    def __init__(self):
        super().__init__()
        self.shapes = _gemm_shapes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.shapes:
            operand = args[1] if func is torch.ops.aten.addmm.default else args[0]
            return operand.new_zeros(self.shapes[func](*args, **kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def unexecuted():
    """Within the block, a recording records each launch and does not run it, and torch's matrix
    products are zeros (`_ZeroGemms`): for work whose outputs nothing reads on the host (a CUDA
    graph's warm-up step, a training micro-batch: capturable, so free of syncs), where the CPU
    would spend minutes computing values that decide nothing (a vocabulary-wide LM head per batch
    size). The launches' outputs are left unwritten."""
    before, _Unexecuted.active = _Unexecuted.active, True
    try:
        with _ZeroGemms():
            yield
    finally:
        _Unexecuted.active = before


@contextlib.contextmanager
def recording(launches: dict):
    """Within the block, every interpreted launch is added to `launches` (key -> record):
    {"kernel": "module:qualname", "args": [[name, description] of the positional args, in order],
     "options": constexpr and launch keywords, "grid": programs of the first such launch}."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        bound = dict(zip(names, args))
        positional = [[n, _describe(bound[n])] for n in names if n in bound]
        options = {k: GPU_CONSTEXPRS.get(k, v) for k, v in kwargs.items() if k not in bound}
        grid_size = grid(kwargs) if callable(grid) else grid
        kernel = f"{self.fn.__module__}:{self.fn.__qualname__}"
        record = {"kernel": kernel, "args": positional, "options": options,
                  "grid": list(grid_size) + [1] * (3 - len(grid_size))}
        unspecialized = set(self.kwargs.get("do_not_specialize") or ())
        launches.setdefault(specialization_key(kernel, positional, options, unspecialized), record)
        if _Unexecuted.active:
            return None
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def record_workload(quick: bool) -> list[dict]:
    """The distinct launches of gpucheck.workload (records as `recording` makes them), recorded in
    an interpreter child process."""
    code = ("import json, sys; from gpucheck.record import recording; from gpucheck import workload\n"
            "launches = {}\n"
            f"with recording(launches): workload.run(quick={quick})\n"
            "json.dump(list(launches.values()), sys.stdout)")
    # The workload runs in the interpreter on CPU tensors, also on a GPU machine: hiding the GPU
    # keeps its tensors on the CPU (on CUDA they would go to the real kernels, which record nothing).
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": f"{TOOLS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"recording the workload's launches failed (exit {out.returncode}):\n"
                           f"{out.stderr[-4000:]}")
    return json.loads(out.stdout)
