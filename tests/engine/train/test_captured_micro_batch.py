"""A captured training micro-batch (engine/train/captured_micro_batch.py): the pack padded to its
bucket gives the loss and gradients of the pack alone, gradients accumulate as an eager backward's,
bad packs are refused by name, and the captured step makes no host sync and no host tensor (what
would break a capture), counted on the CPU. The graph itself: the gpu test."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedrl.bench.launch_count import LaunchCounter
from fusedrl.bench.shapes import qwen_like
from fusedrl.engine.model.lm_head import lm_head_logprobs
from fusedrl.engine.train.captured_micro_batch import CapturedMicroBatch, Column, filler_lengths
from fusedrl.engine.train.flat_grads import FlatGradients
from fusedrl.kernels import use_backend

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
             head_dim=8, max_model_len=64)
COLUMNS = {"labels": Column(torch.int64, 0), "weight": Column(torch.float32, 0.0)}


def model_and_loss(device="cpu", dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    model = qwen_like(2, dtype, device, **{**SMALL, **overrides})

    def loss(hidden, columns):
        logp = lm_head_logprobs(hidden, model.lm_head.weight, columns["labels"])
        return -(logp * columns["weight"]).sum()
    return model, loss


def random_pack(seqlens, device="cpu", seed=1):
    """ids, labels and weights (1 / tokens: the mean over the pack) of packed `seqlens`."""
    g = torch.Generator().manual_seed(seed)
    n = sum(seqlens)
    ids = torch.randint(1, SMALL["vocab_size"], (n,), generator=g)
    labels = torch.randint(0, SMALL["vocab_size"], (n,), generator=g)
    weight = torch.full((n,), 1.0 / n)
    return ids.to(device), {"labels": labels.to(device), "weight": weight.to(device)}


def eager_grads(model, loss, packs):
    """Loss of each pack and the summed gradients, through forward_packed on the packs as they
    are."""
    model.zero_grad(set_to_none=True)
    losses = []
    for seqlens, (ids, columns) in packs:
        value = loss(model.forward_packed(ids, seqlens), columns)
        value.backward()
        losses.append(value.detach())
    return losses, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("packs", [
    [[7, 3, 12]],  # 22 real tokens; 12 filler rows in three filler sequences
    [[1], [5, 9, 2, 1]],  # T=1, then another pack: the gradients add up
    [[28, 1], [9, 14, 3, 2, 1]],  # a sequence near the bound; then a full bucket (one filler row)
])
def test_padded_pack_gives_the_packs_loss_and_gradients(packs):
    model, loss = model_and_loss()
    data = [(seqlens, random_pack(seqlens, seed=i)) for i, seqlens in enumerate(packs)]
    want_losses, want_grads = eager_grads(model, loss, data)
    captured = CapturedMicroBatch(model, loss, COLUMNS, tokens=29, sequences=5)
    model.zero_grad(set_to_none=True)
    for (seqlens, (ids, columns)), want in zip(data, want_losses):
        torch.testing.assert_close(captured.run(ids, seqlens, columns), want)
    for p, want in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=1e-5)


def test_filler_rows_that_the_loss_weighs_would_move_it():
    """The check above can fail: a loss that counts the filler rows differs from the pack's."""
    model, loss = model_and_loss()
    seqlens = [7, 3]
    ids, columns = random_pack(seqlens)
    (want,), _ = eager_grads(model, loss, [(seqlens, (ids, columns))])
    counted = {"labels": Column(torch.int64, 0), "weight": Column(torch.float32, 0.5)}
    got = CapturedMicroBatch(model, loss, counted, tokens=16, sequences=3).run(ids, seqlens,
                                                                               columns)
    assert not torch.allclose(got, want)


def test_filler_lengths_and_fits():
    assert filler_lengths(7, 3) == [3, 2, 2]
    assert filler_lengths(3, 3) == [1, 1, 1]
    assert filler_lengths(1, 1) == [1]
    model, loss = model_and_loss()
    captured = CapturedMicroBatch(model, loss, COLUMNS, tokens=10, sequences=3)
    assert captured.rows == 16  # 10 + 3 rounded up to a multiple of 16
    assert captured.fits(10, 3) and captured.fits(10, 1) and captured.fits(1, 1)
    assert captured.fits(3, 3)
    assert not captured.fits(11, 1) and not captured.fits(5, 4) and not captured.fits(2, 3)
    assert not captured.fits(0, 0)


@pytest.mark.parametrize("seqlens, columns_change, message", [
    ([30, 30, 30], None, "does not fit the bucket"),
    ([4, 0, 3], None, "seqlens must be positive"),
    ([70], None, "exceeds max_model_len"),
    ([4, 3], ("weight", torch.float64), "columns\\['weight'\\] is torch.float64"),
    ([4, 3], ("extra", torch.float32), "expected \\['labels', 'weight'\\]"),
])
def test_bad_packs_are_refused_by_name(seqlens, columns_change, message):
    model, loss = model_and_loss()
    captured = CapturedMicroBatch(model, loss, COLUMNS, tokens=80, sequences=3)
    ids, columns = random_pack([max(s, 1) for s in seqlens])
    ids = ids[:sum(seqlens)]
    columns = {k: v[:sum(seqlens)] for k, v in columns.items()}
    if columns_change is not None:
        name, dtype = columns_change
        columns[name] = torch.zeros(sum(seqlens), dtype=dtype)
    with pytest.raises(ValueError, match=message):
        captured.run(ids, seqlens, columns)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tokens=4, sequences=5), "sequences=5 exceeds tokens=4"),
    (dict(tokens=0, sequences=1), "tokens=0"),
    (dict(tokens=8, sequences=2, warmup=0), "warmup=0"),
])
def test_bad_buckets_are_refused_by_name(kwargs, message):
    model, loss = model_and_loss()
    with pytest.raises(ValueError, match=message):
        CapturedMicroBatch(model, loss, COLUMNS, **kwargs)


class HostTensors(TorchDispatchMode):
    """Counts tensors made from host data (torch.tensor, as_tensor, from_numpy: aten.lift_fresh):
    on a GPU each is a host-to-device copy, which a capture refuses."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.lift_fresh.default
        return func(*args, **(kwargs or {}))


def test_the_captured_step_makes_no_host_sync_and_no_host_tensor(monkeypatch):
    """What the graph would hold (the forward, the loss, the backward) on the fused kernels as a GPU
    runs them, with the label check that reads values off, as it is on a GPU
    (dispatch.sync_checks_enabled): no sync, no tensor from host data. The check can fail: with the
    label check on, the same count finds its sync."""
    model, loss = model_and_loss()
    seqlens = [5, 6]
    ids, columns = random_pack(seqlens)
    captured = CapturedMicroBatch(model, loss, COLUMNS, tokens=16, sequences=3)
    with use_backend("triton"):
        captured.run(ids, seqlens, columns)  # warm: the cast RoPE tables, the varlen check
        with LaunchCounter() as counter:
            captured._step()
        assert sum(counter.syncs.values()) == 1  # the CPU's label check
        monkeypatch.setattr("fusedrl.kernels.rl.linear_logprobs.sync_checks_enabled",
                            lambda x: False)
        with LaunchCounter() as counter, HostTensors() as host:
            captured._step()
    assert dict(counter.syncs) == {} and host.count == 0
    assert counter.launches > 0


def test_runs_add_into_flat_gradients_whatever_zero_grad_did():
    """The runs add into views of one flat buffer (set on .grad at the first run, holding what
    .grad held); after the model's zero_grad() (every .grad None), a replacing tensor, or the
    object's own zero_grad(), the gradients are an eager backward's from the same start."""
    model, loss = model_and_loss()
    packs = [[7, 3, 12], [5, 9]]
    data = [(seqlens, random_pack(seqlens, seed=i)) for i, seqlens in enumerate(packs)]
    _, first = eager_grads(model, loss, data[:1])
    _, second = eager_grads(model, loss, data[1:])
    captured = CapturedMicroBatch(model, loss, COLUMNS, tokens=29, sequences=5)
    params = list(model.parameters())
    model.zero_grad(set_to_none=True)

    def run(k):
        seqlens, (ids, columns) = data[k]
        captured.run(ids, seqlens, columns)
    run(0)
    buffer, = captured.grads.buffers
    assert all(p.grad.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
               for p in params)
    for p, want in zip(params, first):
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=1e-5)
    model.zero_grad(set_to_none=True)
    run(1)
    for p, want in zip(params, second):
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=1e-5)
    views = [p.grad for p in params]
    params[0].grad = first[0].clone()  # a replacing tensor: its values are kept, in the view
    params[1].grad = None
    run(1)
    assert all(p.grad is v for p, v in zip(params, views))
    torch.testing.assert_close(params[0].grad, first[0] + second[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(params[1].grad, second[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(params[2].grad, 2 * second[2], atol=1e-6, rtol=1e-5)
    captured.zero_grad()
    assert all(p.grad is v and not v.any() for p, v in zip(params, views))
    run(0)
    for p, want in zip(params, first):
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=1e-5)


def test_an_unreached_parameter_holds_zeros_and_a_changed_trained_set_is_refused():
    """A trained parameter no backward reaches holds zeros (as a graph gives it), not None; a run
    or zero_grad() after requires_grad changed is refused by name."""
    model, loss = model_and_loss()
    unreached = torch.nn.Parameter(torch.ones(3))
    model.register_parameter("unreached", unreached)
    captured = CapturedMicroBatch(model, loss, COLUMNS, tokens=29, sequences=5)
    seqlens = [7, 3]
    ids, columns = random_pack(seqlens)
    captured.run(ids, seqlens, columns)
    assert torch.equal(unreached.grad, torch.zeros(3))
    model.lm_head.weight.requires_grad_(False)
    for call in (lambda: captured.run(ids, seqlens, columns), captured.zero_grad):
        with pytest.raises(ValueError, match="requires_grad changed.*make a new CapturedMicroBatch"):
            call()


def test_flat_gradients_keep_values_and_refuse_sharded_parameters():
    """A parameter's gradient keeps its value in the buffer (zeros where it had none), one buffer
    per dtype; zero_() zeroes every one in place; a tensor subclass (a DTensor) is refused by
    name."""
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(5)),
              torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
    values = [torch.randn(3, 2), None, torch.randn(4, dtype=torch.float64)]
    for p, v in zip(params, values):
        p.grad = None if v is None else v.clone()
    flat = FlatGradients(params)
    assert [b.dtype for b in flat.buffers] == [torch.float32, torch.float64]
    assert [b.numel() for b in flat.buffers] == [11, 4]
    assert torch.equal(params[0].grad, values[0]) and torch.equal(params[2].grad, values[2])
    assert torch.equal(params[1].grad, torch.zeros(5))
    flat.zero_()
    assert not any(b.any() for b in flat.buffers)
    assert all(p.grad.data_ptr() in range(b.data_ptr(), b.data_ptr() + b.nbytes)
               for p in params for b in flat.buffers if b.dtype == p.dtype)

    class Sharded(torch.Tensor):  # what a DTensor parameter's .data is: not a plain tensor
        pass
    with pytest.raises(ValueError, match="a parameter is a Sharded: expected plain tensors"):
        FlatGradients([torch.nn.Parameter(torch.randn(4).as_subclass(Sharded))])


@pytest.mark.gpu
def test_replays_give_the_eager_steps_loss_and_gradients_on_a_gpu():
    """On CUDA: captured once, replayed for packs of other lengths (fewer sequences, a filler of
    many rows), the losses and the summed gradients are the eager steps'; after the model's
    zero_grad() (every .grad set to None) or the object's (its flat buffers zeroed) a replay's
    gradients are its pack's alone."""
    model, loss = model_and_loss("cuda", torch.bfloat16, head_dim=64)  # the model's head size
    packs = [[40, 17, 3], [64], [9, 9, 30, 11]]
    data = [(seqlens, random_pack(seqlens, "cuda", seed=i)) for i, seqlens in enumerate(packs)]
    want_losses, want_grads = eager_grads(model, loss, data)
    captured = CapturedMicroBatch(model, loss, COLUMNS, tokens=72, sequences=5)
    model.zero_grad(set_to_none=True)
    for (seqlens, (ids, columns)), want in zip(data, want_losses):
        torch.testing.assert_close(captured.run(ids, seqlens, columns).clone(), want,
                                   atol=0, rtol=1e-2)
    assert captured.graph is not None
    for (name, p), want in zip(model.named_parameters(), want_grads):
        # bf16 gradients summed in another order (the padded GEMMs): ~1% of their norm; a row
        # attending across a boundary or a lost micro-batch moves them by tens of percent.
        error = (p.grad.float() - want.float()).norm() / want.float().norm()
        assert error < 0.05, (name, error)
    _, want_grads = eager_grads(model, loss, data[:1])
    seqlens, (ids, columns) = data[0]
    for zero_grad in (lambda: model.zero_grad(set_to_none=True), captured.zero_grad):
        zero_grad()
        captured.run(ids, seqlens, columns)
        for (name, p), want in zip(model.named_parameters(), want_grads):
            error = (p.grad.float() - want.float()).norm() / want.float().norm()
            assert error < 0.05, (name, error)


@pytest.mark.gpu
def test_capture_is_refused_where_packed_attention_plans_on_the_host():
    """fp32 on CUDA takes the padded SDPA path (no flash kernel for it), whose host plan a graph
    would replay for every pack."""
    model, loss = model_and_loss("cuda", torch.float32, head_dim=64)
    with pytest.raises(ValueError, match="a graph needs a varlen kernel"):
        CapturedMicroBatch(model, loss, COLUMNS, tokens=32, sequences=2)
