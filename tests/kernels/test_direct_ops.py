"""kernels/direct_ops.py: an op called directly in eager (its own Function's node, the same values and
gradients as through the custom op), through the custom op where something needs one (a dispatch
mode, fake tensors, torch.compile, a differentiable call of an op without a formula), and named
under the profiler."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fusedrl.kernels.direct_ops import direct_op


@direct_op("fusedrl_tests::scaled_sum", mutates_args=())
def scaled_sum(x: torch.Tensor, y: torch.Tensor, scale: float = 2.0) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    """(scale * x + y, x * y): two outputs, a default argument."""
    return scale * x + y, x * y


FAKE_CALLS = []  # the shapes the fake implementation was called with


@scaled_sum.register_fake
def _scaled_sum_fake(x, y, scale=2.0):
    FAKE_CALLS.append(tuple(x.shape))
    return torch.empty_like(x), torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, y, scale = inputs
    ctx.save_for_backward(x, y)
    ctx.scale = scale


def _backward(ctx, grad_sum, grad_product):
    x, y = ctx.saved_tensors
    return ctx.scale * grad_sum + grad_product * y, grad_sum + grad_product * x, None


scaled_sum.register_autograd(_backward, setup_context=_setup)


@direct_op("fusedrl_tests::no_formula", mutates_args=())
def no_formula(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@no_formula.register_fake
def _no_formula_fake(x):
    return torch.empty_like(x)


@direct_op("fusedrl_tests::add_into", mutates_args=("out",))
def add_into(x: torch.Tensor, out: torch.Tensor) -> None:
    """out += x, written past autograd (as a kernel writes)."""
    out.data.add_(x)


@add_into.register_fake
def _add_into_fake(x, out):
    return None


@pytest.fixture
def op_calls(monkeypatch):
    """How many calls went through scaled_sum's custom op."""
    calls = []
    op = scaled_sum.op

    def counted(*args, **kwargs):
        calls.append(1)
        return op(*args, **kwargs)
    monkeypatch.setattr(scaled_sum, "op", counted)
    return calls


class OpsSeen(TorchDispatchMode):
    """The ops dispatched below Python, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2)]


def _run(fn, x, y, **kwargs):
    """Outputs and the gradients of x and y under fixed upstream gradients."""
    a, b = fn(x, y, **kwargs)
    upstream = torch.linspace(-1, 1, a.numel(), dtype=a.dtype).view_as(a)
    grads = torch.autograd.grad([a, b], [x, y], [upstream, upstream.flip(0)])
    return (a.detach(), b.detach()) + grads


def test_eager_call_is_direct_with_the_custom_ops_values_and_gradients(op_calls):
    x, y = _inputs()
    direct = scaled_sum(x, y, 0.5)
    assert not op_calls
    assert type(direct[0].grad_fn).__name__ == "fusedrl_tests_scaled_sumBackward"
    through_op = scaled_sum.op(x, y, 0.5)
    assert type(through_op[0].grad_fn).__name__.startswith("GeneratedBackwardFor")
    for got, want in zip(_run(scaled_sum, x, y, scale=0.5), _run(scaled_sum.op, x, y, scale=0.5)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # gradcheck of the direct path's formula against finite differences
    assert torch.autograd.gradcheck(lambda a, b: scaled_sum(a, b, 0.5), (x, y))


def test_defaults_and_keywords_bind_as_the_schema_orders_them():
    x, y = _inputs()
    for call in (scaled_sum(x, y), scaled_sum(x, y=y), scaled_sum(y=y, x=x, scale=2.0)):
        torch.testing.assert_close(call[0], 2.0 * x + y, rtol=0, atol=0)
    with pytest.raises(TypeError):
        scaled_sum(x)


def test_no_grad_call_runs_the_function_and_makes_no_node(op_calls):
    x, y = _inputs()
    with torch.no_grad():
        a, b = scaled_sum(x, y)
    with torch.inference_mode():
        scaled_sum(x, y)
    assert not op_calls
    assert a.grad_fn is None and not a.requires_grad
    torch.testing.assert_close(b, x.detach() * y.detach(), rtol=0, atol=0)


def test_a_dispatch_mode_sees_the_custom_op(op_calls):
    x, y = (t.detach() for t in _inputs())
    with OpsSeen() as seen:
        scaled_sum(x, y)
    assert seen.names == ["fusedrl_tests.scaled_sum"]
    x, y = _inputs()
    with OpsSeen() as seen:  # with autograd: the op, then its formula's ops in the backward
        a, _ = scaled_sum(x, y)
        a.sum().backward()
    assert seen.names[0] == "fusedrl_tests.scaled_sum"
    assert seen.names.count("fusedrl_tests.scaled_sum") == 1
    assert len(op_calls) == 2


def test_fake_tensors_meet_the_fake_implementation():
    FAKE_CALLS.clear()
    with FakeTensorMode():
        a, b = scaled_sum(torch.empty(4, 2), torch.empty(4, 2))
    assert a.shape == b.shape == (4, 2) and FAKE_CALLS == [(4, 2)]


def test_a_tensor_subclass_goes_through_the_op(op_calls):
    class Tagged(torch.Tensor):
        pass
    x, y = (t.detach().as_subclass(Tagged) for t in _inputs())
    scaled_sum(x, y)
    assert len(op_calls) == 1


def test_a_direct_write_bumps_the_version_as_the_custom_op_does():
    x = torch.ones(3, requires_grad=True)
    out = torch.zeros(3)
    saved = (x * out).sum()  # mul saves `out` for x's gradient
    for write in (add_into, add_into.op):
        version = out._version
        write(x.detach(), out)
        assert out._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_a_formula_for_an_op_taking_a_list_of_tensors_is_refused():
    @direct_op("fusedrl_tests::list_sum", mutates_args=())
    def list_sum(xs: list[torch.Tensor]) -> torch.Tensor:
        return sum(xs)
    with pytest.raises(TypeError, match="fusedrl_tests::list_sum: .* no list of tensors"):
        list_sum.register_autograd(lambda ctx, grad: None)


def test_without_a_formula_a_differentiable_call_goes_through_the_op():
    x, _ = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(no_formula(x), 3 * x, rtol=0, atol=0)
    out = no_formula(x)  # the custom op refuses at the backward, as torch.library's does
    with pytest.raises(RuntimeError, match="autograd"):
        out.sum().backward()


def test_torch_compile_traces_the_custom_op():
    x, y = (t.detach() for t in _inputs())
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(str(graph.graph))
        return graph.forward
    compiled = torch.compile(lambda a, b: scaled_sum(a, b, 0.5)[0] * 2, fullgraph=True,
                             backend=backend)
    torch.testing.assert_close(compiled(x, y), (0.5 * x + y) * 2, rtol=0, atol=0)
    assert len(graphs) == 1 and "fusedrl_tests.scaled_sum" in graphs[0]


def test_the_profiler_names_a_direct_call():
    x, y = _inputs()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        scaled_sum(x, y)[0].sum().backward()
    names = {event.name for event in prof.events()}
    assert "fusedrl_tests::scaled_sum" in names
