"""Our custom ops, defined once and called at an eager call's host cost where nothing needs the op.

Why: every fused op is a `torch.library.custom_op` (namespace fusedrl), so that torch.compile sees
one opaque node and a TorchDispatchMode (the launch and traffic counters, FakeTensorMode) one op.
But a call through a custom op with an autograd formula costs its wrapper's Python on every call:
the dispatcher enters Python twice (autograd, then the implementation) and the formula runs in a
Function built around it. On a GPU the training step is made of such calls (the H100 profile of a
1k-token micro-batch: its device busy 14% of the wall, rms_norm's backward 317 us of host a call);
on this repository's CPU a 4-layer training micro-batch's host side (its Triton launches skipped)
took 15.3 ms with every op through its custom op and 12.9 ms called as below
(`bench/results/host_cost_cpu.md`, tests/tools/host_cost.py).

So `direct_op` makes the custom op as `torch.library.custom_op` does and keeps its Python function:
a call takes

- the custom op while torch.compile traces, while any TorchDispatchMode is active (the counters
  count it, fake tensors meet its fake implementation), for tensor subclasses (a DTensor), and for a
  differentiable call of an op without an autograd formula (the op says so at its backward);
- otherwise the function itself, and, where a tensor argument requires a gradient, through a
  `torch.autograd.Function` built from the formula registered with `register_autograd` (the same
  setup_context and backward, so the same saved tensors and the same gradients).

Both run the same Python and the same kernels: the same numbers. A direct call of an op that
writes into its arguments (mutates_args) bumps their version counters as the custom op does (the
kernels write past autograd's notice), so autograd still refuses a saved tensor changed in place.
Under the profiler the direct call is recorded under the op's name (record_function), as the custom
op's would be.
"""
from __future__ import annotations

import inspect
from typing import Callable, Iterable, Optional

import torch
from torch.autograd import profiler

# Tensor types a direct call takes as they are; any other (a subclass) goes through the op.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


class DirectOp:
    """A custom op (`self.op`, a torch CustomOpDef named `name`) and its Python function `fn`,
    called as the module docstring says. register_fake and register_autograd as the CustomOpDef's
    (used the same way, as decorators or calls)."""

    def __init__(self, name: str, fn: Callable, mutates_args: Iterable[str]):
        if isinstance(mutates_args, str):  # torch's "unknown": a direct call could not bump them
            raise ValueError(f"{name}: mutates_args={mutates_args!r}, expected the names of the "
                             "arguments the op writes into")
        self.op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        self.name, self.fn = name, fn
        self._signature = inspect.signature(fn)
        self._arity = len(self._signature.parameters)
        names = list(self._signature.parameters)
        self._mutated = tuple(names.index(arg) for arg in mutates_args)
        self._function: Optional[type[torch.autograd.Function]] = None
        self.__name__, self.__doc__ = fn.__name__, fn.__doc__

    def register_fake(self, fake: Callable) -> Callable:
        """The op's fake implementation (shapes and dtypes for torch.compile and fake tensors)."""
        return self.op.register_fake(fake)

    def register_autograd(self, backward: Callable, *,
                          setup_context: Optional[Callable] = None) -> None:
        """The op's autograd formula, as torch.library's: backward(ctx, *grads) -> a gradient per
        input; setup_context(ctx, inputs, output) saves what it needs. Not for an op taking a
        list of tensors (torch.library flattens those for the formula; the Function would not)."""
        schema = self.op._opoverload._schema
        if any(str(arg.type).startswith("List[Tensor") for arg in schema.arguments):
            raise TypeError(f"{self.name}: a direct op with an autograd formula takes no list of "
                            "tensors")
        self.op.register_autograd(backward, setup_context=setup_context)
        self._function = _autograd_function(self.name, self.fn, backward, setup_context)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # first: nothing below is for Dynamo to trace
            return self.op(*args, **kwargs)
        if kwargs or len(args) != self._arity:  # positional, in the schema's order, defaults in
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args = bound.args
        if torch._C._len_torch_dispatch_stack():
            return self.op(*args)
        differentiable = False
        for arg in args:
            for tensor in (arg if isinstance(arg, (list, tuple)) else (arg,)):
                if isinstance(tensor, torch.Tensor):
                    if type(tensor) not in _PLAIN:
                        return self.op(*args)
                    differentiable = differentiable or tensor.requires_grad
        call = self.fn
        if differentiable and torch.is_grad_enabled():
            if self._function is None:
                return self.op(*args)
            call = self._function.apply
        if profiler._is_profiler_enabled:
            with profiler.record_function(self.name):
                output = call(*args)
        else:
            output = call(*args)
        for i in self._mutated:  # one tensor a call: older torch takes no list
            if isinstance(args[i], torch.Tensor):
                torch.autograd.graph.increment_version(args[i])
        return output


def direct_op(name: str, *, mutates_args: Iterable[str]) -> Callable[[Callable], DirectOp]:
    """Decorator: `torch.library.custom_op(name, mutates_args=...)`'s, returning a DirectOp."""
    def make(fn: Callable) -> DirectOp:
        return DirectOp(name, fn, mutates_args)
    return make


def _autograd_function(name: str, fn: Callable, backward: Callable,
                       setup_context: Optional[Callable]) -> type[torch.autograd.Function]:
    """A torch.autograd.Function running `fn` with the formula registered on the op `name`. Its
    forward takes ctx and calls setup_context itself: a Function with a setup_context staticmethod
    binds its arguments to forward's signature (inspect) on every call."""

    def forward(ctx, *args):
        output = fn(*args)
        if setup_context is not None:
            setup_context(ctx, args, output)
        return output

    return type(name.replace("::", "_"), (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    })
