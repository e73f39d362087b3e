"""linear_token_logprobs (chunked, Triton backend; cuBLAS GEMMs + row kernels, or the fused Triton
GEMMs) against the float64 reference composition."""
import pytest
import torch

import fusedrl.kernels.rl.linear_logprobs as linear_module
from fusedrl.kernels import linear_token_logprobs, reference, use_backend
from kernel_testing import DEVICE, assert_close, assert_within_torch_error, needs_triton

pytestmark = needs_triton


def make_inputs(n_rows, hidden_size, vocab, dtype, *, bias):
    hidden = torch.randn(n_rows, hidden_size, device=DEVICE).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=DEVICE) / hidden_size**0.5 * 3).to(dtype)
    b = (torch.randn(vocab, device=DEVICE) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, vocab, (n_rows,), device=DEVICE)
    labels[torch.rand(n_rows, device=DEVICE) < 0.2] = -100
    return hidden, weight, b, labels


def outputs_and_grads(fn, hidden, weight, bias, labels, g_logp, g_entropy, **kwargs):
    params = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    logp, entropy = fn(params[0], params[1], labels, bias=params[2] if bias is not None else None,
                       return_entropy=True, **kwargs)
    (logp * g_logp + entropy * g_entropy).sum().backward()
    return [logp, entropy] + [p.grad for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size, fuse_matmul", [
    # 4: 10 row chunks, a one-row tail; backward vocabulary chunks of 100 columns (under a tile:
    # unaligned starts). 7: 6 row chunks; whole 128-column vocabulary chunks and a 104-column tail.
    (4, False), (7, False), (None, False),
    (4, True), (None, True),                # the fused GEMMs: several backward chunks, or one
])
def test_matches_reference(chunk_size, fuse_matmul, bias, dtype):
    inputs = make_inputs(37, 24, 1000, dtype, bias=bias)
    g = [torch.randn(37, device=DEVICE) for _ in range(2)]
    with use_backend("triton"):
        ours = outputs_and_grads(linear_token_logprobs, *inputs, *g, temperature=0.8,
                                 chunk_size=chunk_size, fuse_matmul=fuse_matmul)
    exact = outputs_and_grads(reference.linear_token_logprobs,
                              *[t.double() if t is not None and t.is_floating_point() else t for t in inputs],
                              *[x.double() for x in g], temperature=0.8)
    names = ["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"]
    if dtype == torch.float32:
        for name, a, e in zip(names, ours, exact):
            assert_close(a, e, atol=1e-4, rtol=1e-4, name=name)
        return
    # bf16: the LM-head matmuls round like the model's own; compare with PyTorch's error on the
    # same bf16 inputs (its matmul in bf16, then the reference log-softmax).
    torch_lowp = outputs_and_grads(reference.linear_token_logprobs, *inputs, *g, temperature=0.8)
    for name, a, e, t in zip(names, ours, exact, torch_lowp):
        assert_within_torch_error(a, e, t, name=name, slack=2.0, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_splits_skipped_row_tiles_and_masked_vocabulary(dtype):
    """The fused GEMMs at a shape that takes three vocabulary splits in forward (3000 columns, 24
    tiles), a first row tile that is all ignored (computed by no program: its zeros come from the
    combine), a one-row last tile, and -inf logits from the bias (masked vocabulary entries)."""
    hidden, weight, bias, labels = make_inputs(129, 40, 3000, dtype, bias=True)
    assert linear_module.vocab_splits(2, 3000, linear_module.SMS_WITHOUT_GPU)[0] == 3
    labels[:128] = -100
    labels[128] = 2500
    masked = torch.randperm(3000, device=DEVICE)[:300]
    bias[masked[masked != 2500]] = float("-inf")
    g = [torch.randn(129, device=DEVICE) for _ in range(2)]
    with use_backend("triton"):
        ours = outputs_and_grads(linear_token_logprobs, hidden, weight, bias, labels, *g,
                                 fuse_matmul=True, chunk_size=1)  # 1: 23-column backward chunks
    exact = outputs_and_grads(reference.linear_token_logprobs, hidden.double(), weight.double(),
                              bias.double(), labels, *[x.double() for x in g])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, e in zip(["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"], ours, exact):
        assert_close(a, e, atol=tol, rtol=tol, name=name)
    assert torch.all(ours[0][:128] == 0) and torch.all(ours[1][:128] == 0)
    assert torch.all(ours[2][:128] == 0)


def test_fused_forward_makes_no_logits(monkeypatch):
    """fuse_matmul: no LM-head matmul through torch at all; the logits exist only in the kernels."""
    def no_linear(*args, **kwargs):
        raise AssertionError("F.linear called on the fused path")

    monkeypatch.setattr(linear_module.F, "linear", no_linear)
    hidden, weight, _, labels = make_inputs(20, 16, 300, torch.bfloat16, bias=False)
    with use_backend("triton"):
        logp = linear_token_logprobs(hidden.requires_grad_(), weight, labels)  # 16-bit: fused by default
    logp.sum().backward()
    assert hidden.grad.shape == hidden.shape


@pytest.mark.parametrize("n_row_tiles, vocab, expected", [
    (128, 151936, (3, 50688)),   # the bar's shape (16384 rows of 128): 384 programs for 132 SMs
    (1, 151936, (132, 1152)),    # one row tile: 264 programs wanted, splits of 9 tiles give 132
    (2000, 151936, (1, 151936)),  # many row tiles: no split
    (1, 1000, (1, 1024)),        # fewer than 8 tiles: one split
])
def test_vocab_splits(n_row_tiles, vocab, expected):
    splits, cols = linear_module.vocab_splits(n_row_tiles, vocab, 132)
    assert (splits, cols) == expected
    assert (splits - 1) * cols < vocab <= splits * cols and cols % 128 == 0


def test_logp_only_and_frozen_weight():
    hidden, weight, _, labels = make_inputs(20, 16, 300, torch.float32, bias=False)
    h = hidden.clone().requires_grad_()
    with use_backend("triton"):
        linear_token_logprobs(h, weight, labels, chunk_size=6).sum().backward()
    h64 = hidden.double().requires_grad_()
    reference.linear_token_logprobs(h64, weight.double(), labels).sum().backward()
    assert_close(h.grad, h64.grad, atol=1e-5, rtol=1e-5, name="grad_hidden")


@pytest.mark.parametrize("fuse_matmul", [False, True])
def test_empty(fuse_matmul):
    hidden, weight, _, labels = make_inputs(0, 8, 50, torch.float32, bias=False)
    h = hidden.requires_grad_()
    with use_backend("triton"):
        logp, entropy = linear_token_logprobs(h, weight.requires_grad_(), labels, return_entropy=True,
                                              fuse_matmul=fuse_matmul)
    assert logp.shape == entropy.shape == (0,)
    (logp.sum() + entropy.sum()).backward()
    assert h.grad.shape == (0, 8) and torch.all(weight.grad == 0)


def test_logits_never_exceed_one_chunk(monkeypatch):
    """No [N, V] tensor: every LM-head matmul makes at most chunk_size x V logits, forward (row
    chunks) and backward (vocabulary chunks), and each logit is computed once each way."""
    seen = []
    real_linear = linear_module.F.linear

    def recording_linear(x, w, b=None):
        out = real_linear(x, w, b)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(linear_module.F, "linear", recording_linear)
    hidden, weight, _, labels = make_inputs(50, 8, 64, torch.float32, bias=False)
    with use_backend("triton"):
        linear_token_logprobs(hidden.requires_grad_(), weight, labels, chunk_size=16).sum().backward()
    assert seen and max(seen) <= 16 * 64
    assert sum(seen) == 2 * 50 * 64


@pytest.mark.parametrize("n_rows, vocab, chunk, expected", [
    (16384, 151936, 880, 8064),     # the bar's shape: 880 rows' worth of logits, whole 128-column tiles
    (37, 1000, 1, 27),              # fewer than 128 columns: taken as they come
    (10, 50, 16, 50),               # more than the vocabulary: one chunk
    (4, 50257, 4, 50257),           # exactly the vocabulary: one chunk, no 81-column tail
    (16384, 50257, 1000, 2816),     # 18 even chunks: the last has 2385 columns (2944 a chunk would leave 209)
])
def test_vocab_chunk_holds_the_row_chunks_budget(n_rows, vocab, chunk, expected):
    cols = linear_module.vocab_chunk_size(n_rows, vocab, chunk)
    assert cols == expected and n_rows * cols <= max(chunk * vocab, n_rows)


def test_default_chunk_is_bounded_independent_of_rows():
    assert linear_module.default_chunk_size(10, 151936) == 10
    big = linear_module.default_chunk_size(10**6, 151936)
    assert big == linear_module.default_chunk_size(10**7, 151936)
    assert big * 151936 * 2 <= linear_module.CHUNK_BYTES


@pytest.mark.parametrize("fuse_matmul", [False, True])
def test_nan_hidden_row_stays_in_its_row(fuse_matmul):
    hidden, weight, _, labels = make_inputs(6, 8, 40, torch.float32, bias=False)
    labels[:] = 3
    hidden[4, 2] = float("nan")
    h = hidden.requires_grad_()
    with use_backend("triton"):
        logp = linear_token_logprobs(h, weight, labels, chunk_size=4, fuse_matmul=fuse_matmul)
    logp.sum().backward()
    assert torch.isnan(logp[4]) and torch.isfinite(logp[[0, 1, 2, 3, 5]]).all()
    assert torch.isfinite(h.grad[[0, 1, 2, 3, 5]]).all()


@pytest.mark.parametrize("bad, error, match", [
    (dict(weight=torch.ones(5, 3)), ValueError, r"expected hidden \[\.\.\., H\] and weight \[V, H\]"),
    (dict(bias=torch.ones(5, dtype=torch.int32)), TypeError, "bias must have dtype"),
    (dict(bias=torch.ones(4)), ValueError, r"bias must be \[5\]"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, r"labels must have shape \(2,\)"),
    (dict(labels=torch.tensor([0, 5])), ValueError, r"labels must be in \[0, 5\)"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (dict(fuse_matmul=1), TypeError, "fuse_matmul must be a bool or None, got 1"),
    (dict(hidden=torch.ones(2, 4, dtype=torch.int32)), TypeError, "hidden must have dtype"),
])
def test_bad_input(bad, error, match, monkeypatch):
    monkeypatch.setenv("FUSEDRL_SYNC_CHECKS", "1")  # the label-range check reads values: off on GPU by default
    args = dict(hidden=torch.ones(2, 4), weight=torch.ones(5, 4), labels=torch.zeros(2, dtype=torch.long))
    args.update(bad)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        linear_token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)
