"""token_logprobs (Triton and CUDA backends) against the float64 reference: values and gradients."""
import pytest
import torch

from fusedrl.kernels import reference, token_logprobs, use_backend
from kernel_testing import (DEVICE, LOW_PRECISION, assert_close, assert_low_precision_close,
                            gpu_only, needs_triton)

pytestmark = needs_triton
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(lead, vocab, dtype, *, scale=3.0, ignore_frac=0.2, neg_inf_frac=0.0):
    """Random logits [*lead, V] (some entries -inf, never at the label) and labels with ignores."""
    logits = torch.randn(*lead, vocab, device=DEVICE) * scale
    labels = torch.randint(0, vocab, lead, device=DEVICE)
    if neg_inf_frac:
        drop = torch.rand(*lead, vocab, device=DEVICE) < neg_inf_frac
        drop.scatter_(-1, labels.unsqueeze(-1), False)
        logits = logits.masked_fill(drop, float("-inf"))
    labels = labels.masked_fill(torch.rand(lead, device=DEVICE) < ignore_frac, -100)
    return logits.to(dtype), labels


def run_and_grad(fn, logits, labels, grad_logp, grad_entropy, **kwargs):
    """Outputs and d(sum(logp * g1 + entropy * g2))/d logits for one implementation."""
    x = logits.detach().clone().requires_grad_()
    logp, entropy = fn(x, labels, return_entropy=True, **kwargs)
    (logp * grad_logp + entropy * grad_entropy).sum().backward()
    return logp, entropy, x.grad


def check_against_reference(backend, logits, labels, **kwargs):
    g_logp = torch.randn(labels.shape, device=DEVICE)
    g_entropy = torch.randn(labels.shape, device=DEVICE)
    with use_backend(backend):
        logp, entropy, grad = run_and_grad(token_logprobs, logits, labels, g_logp, g_entropy, **kwargs)
    ref_logp, ref_entropy, ref_grad = run_and_grad(
        reference.token_logprobs, logits.double(), labels, g_logp.double(), g_entropy.double(), **kwargs)
    assert logp.dtype == entropy.dtype == torch.float32
    assert grad.dtype == logits.dtype
    # Forward math is fp32 on exactly the inputs the oracle sees: fp32-level agreement.
    assert_close(logp, ref_logp, atol=2e-5, rtol=2e-5, name="logp")
    assert_close(entropy, ref_entropy, atol=2e-5, rtol=2e-5, name="entropy")
    if logits.dtype in LOW_PRECISION:
        # The gradient is computed in fp32 and rounded once to the logits' dtype.
        assert_low_precision_close(grad, ref_grad, name="grad")
    else:
        assert_close(grad, ref_grad, atol=2e-5, rtol=2e-5, name="grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32003])
def test_matches_reference(vocab, dtype, fused_backend):
    lead = (4,) if vocab > 10000 else (3, 5)
    logits, labels = make_inputs(lead, vocab, dtype)
    check_against_reference(fused_backend, logits, labels)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("vocab", [9, 17, 50257])
def test_unaligned_rows_take_head_body_and_tail(vocab, dtype, fused_backend):
    # V not a multiple of 16 bytes' worth of elements: rows start at every alignment, so each has
    # a head, an aligned body and a tail (a 9-wide bf16 row may have no body at all).
    lead = (3,) if vocab > 10000 else (9,)
    logits, labels = make_inputs(lead, vocab, dtype, ignore_frac=0.3)
    check_against_reference(fused_backend, logits, labels)


def test_fp64_logits_give_fp32_outputs_on_every_backend():
    """The docstring's fp32 outputs for fp64 logits: the torch backend computes them in fp64 (its
    reference, the oracle, is left at fp64) and returns them rounded, as the fused kernels do."""
    logits, labels = make_inputs((3, 5), 37, torch.float64)
    ref_logp, ref_entropy = reference.token_logprobs(logits, labels, return_entropy=True)
    assert ref_logp.dtype == torch.float64                                   # the oracle keeps fp64
    for backend in ("torch", "triton"):
        x = logits.clone().requires_grad_()
        with use_backend(backend):
            logp, entropy = token_logprobs(x, labels, return_entropy=True)
            alone = token_logprobs(logits, labels)
        assert logp.dtype == entropy.dtype == alone.dtype == torch.float32, backend
        assert_close(logp, ref_logp, atol=2e-5, rtol=2e-5, name=f"logp {backend}")
        assert_close(entropy, ref_entropy, atol=2e-5, rtol=2e-5, name=f"entropy {backend}")
        (logp.sum() + entropy.sum()).backward()
        assert x.grad.dtype == torch.float64, backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature(temperature, dtype, fused_backend):
    logits, labels = make_inputs((2, 7), 333, dtype)
    check_against_reference(fused_backend, logits, labels, temperature=temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neg_inf_logits(dtype, fused_backend):
    # Masked vocabularies: many -inf entries (never at the label), and one row -inf but for the label.
    logits, labels = make_inputs((3, 4), 500, dtype, neg_inf_frac=0.3, ignore_frac=0.0)
    logits[0, 0] = float("-inf")
    logits[0, 0, labels[0, 0]] = 1.0
    check_against_reference(fused_backend, logits, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lanes_across_blocks(dtype, fused_backend):
    # Rows of 3 blocks where each lane sees its max move (a rising ramp), sees only -inf for its
    # first blocks, or sees -inf after finite logits: the per-lane rescales of the shared core.
    vocab = 9001
    logits, labels = make_inputs((4,), vocab, torch.float32, ignore_frac=0.0)
    logits[0] += torch.linspace(-30, 30, vocab, device=DEVICE)
    logits[1, :8500] = float("-inf")
    logits[2, 5000:] = float("-inf")
    logits[3] = torch.linspace(40, -40, vocab, device=DEVICE)
    labels[1], labels[2] = 8700, 17
    check_against_reference(fused_backend, logits.to(dtype), labels)


def test_label_at_neg_inf_logit_gives_neg_inf(fused_backend):
    logits, labels = make_inputs((5,), 64, torch.float32, ignore_frac=0.0)
    logits[2, labels[2]] = float("-inf")
    check_against_reference(fused_backend, logits, labels)
    with use_backend(fused_backend):
        assert token_logprobs(logits, labels)[2].item() == float("-inf")


def test_single_token_and_odd_leading_dims(fused_backend):
    check_against_reference(fused_backend, *make_inputs((1,), 17, torch.float32, ignore_frac=0.0))
    check_against_reference(fused_backend, *make_inputs((1, 1), 1000, torch.bfloat16, ignore_frac=0.0))
    check_against_reference(fused_backend, *make_inputs((2, 3, 5), 31, torch.float32))


def test_empty(fused_backend):
    logits = torch.randn(0, 7, 11, device=DEVICE, requires_grad=True)
    labels = torch.zeros(0, 7, dtype=torch.long, device=DEVICE)
    with use_backend(fused_backend):
        logp, entropy = token_logprobs(logits, labels, return_entropy=True)
    assert logp.shape == entropy.shape == (0, 7)
    (logp.sum() + entropy.sum()).backward()
    assert logits.grad.shape == logits.shape


def test_fully_ignored_rows_are_zero_with_zero_grad(fused_backend):
    logits, labels = make_inputs((4, 6), 100, torch.float32, ignore_frac=0.0)
    labels[1] = -100
    logits[1] = float("nan")  # an ignored row is not even read
    logits.requires_grad_()
    with use_backend(fused_backend):
        logp, entropy = token_logprobs(logits, labels, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    assert torch.all(logp[1] == 0) and torch.all(entropy[1] == 0)
    assert torch.all(logits.grad[1] == 0)
    assert torch.isfinite(logits.grad[[0, 2, 3]]).all()


def test_custom_ignore_index_and_int32_labels(fused_backend):
    logits, labels = make_inputs((6,), 50, torch.float32, ignore_frac=0.0)
    labels[[1, 4]] = 7777
    check_against_reference(fused_backend, logits, labels.int(), ignore_index=7777)


def test_non_contiguous_leading_dims(fused_backend):
    base, labels_base = make_inputs((4, 10), 129, torch.float32)
    logits = base.transpose(0, 1)[::2]             # [5, 4, V], non-contiguous leading dims
    labels = labels_base.transpose(0, 1)[::2]
    assert not logits.is_contiguous()
    check_against_reference(fused_backend, logits, labels)
    check_against_reference(fused_backend, base[::2, 3], labels_base[::2, 3])  # strided 1-d labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_of_a_wider_buffer(fused_backend, dtype):
    # Row stride 1024 but V = 1021: aligned rows whose length is no multiple of a 16-byte vector
    # (the CUDA kernel's vector loop plus its scalar tail).
    base, labels = make_inputs((6,), 1024, dtype)
    logits = base[:, :1021]
    labels = labels.clamp_max(1020)                   # ignore_index -100 stays as it is
    check_against_reference(fused_backend, logits, labels)


def test_nan_row_stays_in_its_row(fused_backend):
    logits, labels = make_inputs((5,), 300, torch.float32, ignore_frac=0.0)
    logits[2, 17] = float("nan")
    logits.requires_grad_()
    with use_backend(fused_backend):
        logp, entropy = token_logprobs(logits, labels, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    others = [0, 1, 3, 4]
    assert torch.isnan(logp[2]) and torch.isnan(entropy[2]) and torch.isnan(logits.grad[2]).all()
    assert torch.isfinite(logp[others]).all() and torch.isfinite(entropy[others]).all()
    assert torch.isfinite(logits.grad[others]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_matches_and_reuses_the_buffer(dtype, fused_backend):
    logits, labels = make_inputs((3, 5), 257, dtype)
    g = torch.randn(labels.shape, device=DEVICE)
    with use_backend(fused_backend):
        x = logits.clone().requires_grad_()
        (token_logprobs(x, labels) * g).sum().backward()
        leaf = logits.clone().requires_grad_()
        y = leaf * 1.0                                   # the buffer that becomes its own gradient
        (token_logprobs(y, labels, inplace_backward=True) * g).sum().backward()
    assert torch.equal(leaf.grad, x.grad)
    assert torch.equal(y, x.grad)                        # y's storage now holds the gradient


def test_logp_only_gradient(fused_backend):
    logits, labels = make_inputs((4, 3), 90, torch.float32)
    with use_backend(fused_backend):
        x = logits.clone().requires_grad_()
        token_logprobs(x, labels).sum().backward()
    y = logits.double().requires_grad_()
    reference.token_logprobs(y, labels).sum().backward()
    assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5, name="grad")


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen_vocab(dtype, fused_backend):
    check_against_reference(fused_backend, *make_inputs((8,), 151936, dtype))


@pytest.mark.parametrize("bad, error, match", [
    (dict(logits=torch.ones(2, 3, dtype=torch.long)), TypeError, "logits must have dtype"),
    (dict(labels=torch.zeros(2, dtype=torch.float32)), TypeError, "labels must have dtype"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, r"labels must have shape \(2,\)"),
    (dict(labels=torch.tensor([0, 3])), ValueError, r"labels must be in \[0, 3\)"),
    (dict(labels=torch.tensor([-1, 0])), ValueError, "got 1 out of range"),
    (dict(temperature=0.0), ValueError, "temperature must be a positive number"),
    (dict(logits=torch.ones(2, 0)), ValueError, "V >= 1"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
])
def test_bad_input(bad, error, match, monkeypatch):
    monkeypatch.setenv("FUSEDRL_SYNC_CHECKS", "1")  # the label-range check reads values: off on GPU by default
    args = dict(logits=torch.ones(2, 3), labels=torch.zeros(2, dtype=torch.long))
    args.update(bad)
    with pytest.raises(error, match=match):
        token_logprobs(args.pop("logits").to(DEVICE), args.pop("labels").to(DEVICE), **args)
