"""Benchmarks draw their random models on the device they run on (bench/shapes.py): a model built
for a device allocates and fills nothing of its size on the host (on a GPU the host's draw was
seconds of each row's setup). The device here is `meta` (no memory, no values): a host-side
build of the model would show as CPU tensors of its weights' shapes. (The rotary table is made on
the host by design, as transformers makes it, and moved: [max_model_len, head_dim], no weight's
shape.)"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedrl.bench import shapes
from fusedrl.bench.bench_moe_decode import moe_model

# Smaller than any weight matrix below, larger than a vector a norm or a shape computation makes.
ELEMENTS = 256


class HostTensors(TorchDispatchMode):
    """The op and shape of every CPU output of at least ELEMENTS elements."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() >= ELEMENTS:
                self.made.append((str(func), tuple(t.shape)))
        return out


def built_on(device, build):
    """(model, the CPU tensors its build made of any of its weights' shapes)."""
    with HostTensors() as host:
        model = build(device)
    weights = {tuple(p.shape) for p in model.parameters()}
    return model, [(op, shape) for op, shape in host.made if shape in weights]


def test_the_engine_model_is_allocated_and_drawn_on_its_device():
    model, made = built_on("meta", lambda d: shapes.qwen_like(2, torch.bfloat16, d))
    assert made == []
    assert {p.device.type for p in model.parameters()} == {"meta"}
    # the check itself: the same build on the CPU makes the embedding there
    _, made = built_on("cpu", lambda d: shapes.qwen_like(2, torch.bfloat16, d))
    assert any(shape == (151936, 896) for _, shape in made)


def test_the_moe_model_is_allocated_and_drawn_on_its_device():
    shape = shapes.moe_decode_shape(quick=True)
    model, made = built_on("meta", lambda d: moe_model(shape, 2, torch.float32, d))
    assert made == [] and {p.device.type for p in model.parameters()} == {"meta"}


def test_a_seed_gives_the_same_drawn_weights():
    torch.manual_seed(3)
    a = shapes.qwen_like(1, torch.float32, "cpu", vocab_size=512, hidden_size=64,
                         intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16)
    torch.manual_seed(3)
    b = shapes.qwen_like(1, torch.float32, "cpu", vocab_size=512, hidden_size=64,
                         intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(p.std() > 0.01 for p in a.parameters() if p.dim() == 2)
