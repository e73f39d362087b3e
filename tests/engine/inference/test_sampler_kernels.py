"""The fused Triton sampler against its oracle, the torch reference `sample_torch`.

Both draw from the same counter-based noise, so for the same seeds they must pick the same tokens
(exact equality is the distribution test: the reference's distributions are tested in test_sampler.py).
"""
import os

import pytest
import torch

from fusedrl.engine.inference.sampler import _top_k_top_p, sample, sample_torch
from fusedrl.engine.inference.sampler_kernels import sample_triton
from fusedrl.kernels import use_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _on_device():
    """Every tensor of these tests on the kernel's device (generators included)."""
    with torch.device(DEVICE):
        yield


def batch(vocab, rows=8, scale=3.0, seed=0):
    """Logits [rows, vocab] and a mix of greedy, plain, tempered, top-k, top-p and combined rows."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * scale
    temperatures = torch.tensor([0.0, 1.0, 0.7, 1.0, 1.3, 1.0, 0.5, 2.0])[:rows]
    top_ks = torch.tensor([0, 0, 0, 5, 7, 0, 50, 3])[:rows]
    top_ps = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.9, 0.5, 0.8, 0.95])[:rows]
    seeds = torch.arange(rows) * 7919 - 3  # a negative seed too
    positions = torch.arange(rows) + 11
    return logits, temperatures, top_ks, top_ps, seeds, positions


def tie_inclusive_logprobs(logits, temperatures, top_ks, top_ps, tokens):
    """The reference's filtered log-prob at `tokens`, keeping every logit equal to the smallest one it
    kept (bf16 rows tie at the top-k/top-p boundary; the kernel keeps all ties, the sort one of them)."""
    greedy = temperatures == 0
    scaled = logits / torch.where(greedy, 1.0, temperatures)[:, None]
    filtered = _top_k_top_p(scaled, top_ks, top_ps)
    floor = filtered.masked_fill(filtered.isinf(), float("inf")).amin(-1, keepdim=True)
    kept = torch.where(greedy[:, None], scaled, scaled.masked_fill(scaled < floor, float("-inf")))
    return kept.log_softmax(-1).gather(1, tokens[:, None])[:, 0]


@pytest.mark.parametrize("vocab", [2, 7, 1031])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_tokens_and_logprobs_as_the_reference(vocab, dtype):
    logits, temperatures, top_ks, top_ps, seeds, positions = batch(vocab)
    logits = logits.to(dtype).float()  # the kernel reads bf16 and computes in fp32
    tokens, logprobs = sample_triton(logits.to(dtype), temperatures, top_ks, top_ps, seeds, positions)
    assert torch.equal(tokens, sample_torch(logits, temperatures, top_ks, top_ps, seeds, positions)[0])
    expected = tie_inclusive_logprobs(logits, temperatures, top_ks, top_ps, tokens)
    torch.testing.assert_close(logprobs, expected, atol=1e-4, rtol=1e-4)


def test_over_many_seeds_tokens_match_and_stay_inside_the_filtered_set():
    logits, temperatures, top_ks, top_ps, _, _ = batch(61, rows=8, scale=2.0)
    reps = 4
    args = [x.repeat_interleave(reps, 0) for x in (logits, temperatures, top_ks, top_ps)]
    seeds, positions = torch.arange(8 * reps) * 31 + 5, torch.full((8 * reps,), 3)
    tokens, logprobs = sample_triton(*args, seeds, positions)
    assert torch.equal(tokens, sample_torch(*args, seeds, positions)[0])
    # Log-prob = log-softmax of the tempered, filtered distribution at the token (greedy: unmodified).
    greedy = args[1] == 0
    scaled = args[0] / torch.where(greedy, 1.0, args[1])[:, None]
    filtered = torch.where(greedy[:, None], scaled, _top_k_top_p(scaled, args[2], args[3]))
    assert torch.isfinite(filtered.gather(1, tokens[:, None])).all()  # never outside the allowed set
    expected = filtered.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)
    assert len(set(tokens[reps:2 * reps].tolist())) > 1  # a plain row does sample (the test can fail)


def test_greedy_is_argmax_with_the_model_logprob():
    logits = torch.randn(4, 1031, generator=torch.Generator(DEVICE).manual_seed(3))
    zeros = torch.zeros(4)
    tokens, logprobs = sample_triton(logits, zeros, torch.tensor([0, 5, 0, 1]), torch.tensor([1.0, 0.1, 0.5, 1.0]),
                                     torch.arange(4), torch.arange(4))
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0])


def test_edge_cases_one_token_vocab_top_k_above_vocab_zero_top_p_empty_batch():
    one = torch.ones(1)
    tokens, logprobs = sample_triton(torch.randn(1, 1), one, torch.tensor([3]), one, torch.tensor([1]), torch.tensor([0]))
    assert tokens.tolist() == [0] and abs(logprobs.item()) < 1e-6
    logits = torch.randn(3, 9, generator=torch.Generator(DEVICE).manual_seed(4))
    # top_k >= V is no filter; top_p = 0 keeps exactly the most likely token (log-prob 0).
    tokens, logprobs = sample_triton(logits, torch.ones(3), torch.tensor([9, 100, 0]), torch.tensor([1.0, 1.0, 0.0]),
                                     torch.arange(3), torch.zeros(3, dtype=torch.int64))
    assert torch.equal(tokens, sample_torch(logits, torch.ones(3), torch.tensor([9, 100, 0]),
                                            torch.tensor([1.0, 1.0, 0.0]), torch.arange(3),
                                            torch.zeros(3, dtype=torch.int64))[0])
    assert tokens[2] == logits[2].argmax() and abs(logprobs[2].item()) < 1e-6
    empty = sample_triton(torch.zeros(0, 9), *(torch.zeros(0, dtype=d) for d in
                          (torch.float32, torch.int64, torch.float32, torch.int64, torch.int64)))
    assert empty[0].shape == (0,) and empty[1].shape == (0,)


def test_a_row_draws_the_same_token_whatever_else_is_in_the_batch():
    logits, *rest = batch(61)
    alone = sample_triton(logits[4:5], *(x[4:5] for x in rest))
    together = sample_triton(logits, *rest)
    assert alone[0].item() == together[0][4].item()


def test_sample_dispatches_to_the_kernel_under_the_triton_backend(monkeypatch):
    import fusedrl.engine.inference.sampler as sampler

    calls = []
    monkeypatch.setattr(sampler, "sample_triton", lambda *a: calls.append(1) or sample_triton(*a))
    logits, *rest = batch(7)
    sample(logits, *rest)
    assert calls == []  # CPU tensors, no override: the torch reference
    with use_backend("triton"):
        sample(logits, *rest)
    assert calls == [1]
