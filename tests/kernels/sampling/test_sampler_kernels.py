"""The split-row Triton sampler against its oracle `reference.sample`, and its draws against the float64
distribution they must follow (the rules in kernels/reference/sampling.py's docstring).

Both draw with the same counter-based noise, so on the same inputs they pick the same tokens; the
chi-square tests check what that sameness cannot: that the kernel's tokens follow the filtered,
renormalized distribution worked out by hand. Every tensor lives on the kernel's device (CUDA when
there is one: the same tests check the GPU).
"""
import math
import warnings

import pytest
import torch

from fusedrl.kernels import reference, sample, use_backend
from fusedrl.kernels.reference.sampling import kept_mask
from fusedrl.kernels.sampling.sampler import CHUNK, sample_triton
from kernel_testing import DEVICE, needs_triton

pytestmark = needs_triton


def rows(n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed0=0, position=3):
    """Sampling parameters of n rows: (temperatures, top_ks, top_ps, seeds, positions, min_ps)."""
    full = lambda value, dtype: torch.full((n,), value, dtype=dtype, device=DEVICE)  # noqa: E731
    return (full(temperature, torch.float32), full(top_k, torch.int64), full(top_p, torch.float32),
            torch.arange(seed0, seed0 + n, device=DEVICE), full(position, torch.int64), full(min_p, torch.float32))


def mixed_batch(vocab, dtype, seed=0):
    """Logits [8, vocab] and a mix of greedy, plain, tempered, top-k, top-p, min-p and combined rows."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    logits = (torch.randn(8, vocab, generator=g, device=DEVICE) * 3).to(dtype)
    logits[5, 1::3] = float("-inf")  # a row with masked tokens
    on = lambda *v, dtype=torch.float32: torch.tensor(v, dtype=dtype, device=DEVICE)  # noqa: E731
    return (logits, on(0.0, 1.0, 0.7, 1.0, 1.3, 1.0, 0.5, 2.0), on(0, 0, 0, 5, 7, 0, 50, 3, dtype=torch.int64),
            on(1.0, 1.0, 1.0, 1.0, 0.9, 0.5, 0.8, 0.95), torch.arange(8, device=DEVICE) * 7919 - 3,  # a negative seed
            torch.arange(8, device=DEVICE) + 11, on(0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.05, 0.0))


def filtered_logprobs(logits, temperatures, top_ks, top_ps, min_ps, tokens):
    """float64 log-prob of `tokens` under each row's kept, renormalized distribution (greedy rows:
    the unmodified model distribution)."""
    greedy = temperatures == 0
    inv_temp = 1.0 / torch.where(greedy, 1.0, temperatures)
    scaled = logits.float() * inv_temp[:, None]
    kept = kept_mask(logits, scaled, inv_temp, top_ks, top_ps, min_ps) | greedy[:, None]
    assert kept.gather(1, tokens[:, None]).all(), "a token outside its row's kept set"
    return scaled.double().masked_fill(~kept, float("-inf")).log_softmax(-1).gather(1, tokens[:, None])[:, 0]


@pytest.mark.parametrize("vocab", [1, 2, 7, 1031, CHUNK + 901])  # the last: two chunks, one partial
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_same_tokens_and_logprobs_as_the_reference(vocab, dtype):
    logits, temperatures, top_ks, top_ps, seeds, positions, min_ps = mixed_batch(vocab, dtype)
    tokens, logprobs = sample_triton(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps)
    ref_tokens, ref_logprobs = reference.sample(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps)
    assert torch.equal(tokens, ref_tokens)
    expected = filtered_logprobs(logits, temperatures, top_ks, top_ps, min_ps, tokens)
    torch.testing.assert_close(logprobs.double(), expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ref_logprobs.double(), expected, atol=2e-5, rtol=2e-5)


# Six tokens with probabilities 0.3, 0.2, 0.2, 0.15, 0.1, 0.05 (a tie at 0.2); each case's kept set
# and renormalized probabilities worked out by hand.
PROBS = torch.tensor([0.3, 0.2, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
CASES = {
    "plain": (dict(), PROBS),
    # the two most likely keys: 0.3 and both tokens of the 0.2 tie -> 0.3, 0.2, 0.2 over 0.7
    "top_k=2 keeps the tie": (dict(top_k=2), torch.tensor([0.3, 0.2, 0.2, 0, 0, 0]) / 0.7),
    # mass strictly above: 0 / 0.3 / 0.3 / 0.7 < 0.75 kept; 0.85 >= 0.75 cut
    "top_p=0.75": (dict(top_p=0.75), torch.tensor([0.3, 0.2, 0.2, 0.15, 0, 0]) / 0.85),
    # top-5 mass 0.95, target 0.8 * 0.95 = 0.76: 0.7 < 0.76 kept, 0.85 cut
    "top_k=5, top_p=0.8": (dict(top_k=5, top_p=0.8), torch.tensor([0.3, 0.2, 0.2, 0.15, 0, 0]) / 0.85),
    # at least half the top probability: >= 0.15
    "min_p=0.5": (dict(min_p=0.5), torch.tensor([0.3, 0.2, 0.2, 0.15, 0, 0]) / 0.85),
    # temperature 0.5 squares the probabilities (sum of squares 0.205)
    "temperature=0.5": (dict(temperature=0.5), PROBS ** 2 / 0.205),
}


def case_rows(n):
    """Logits [n * len(CASES), 6] of PROBS and each case's parameters on n rows (distinct seeds)."""
    params = [rows(n, seed0=1000 * i, **kw) for i, (kw, _) in enumerate(CASES.values())]
    args = [torch.cat(parts) for parts in zip(*params)]
    return PROBS.log().to(DEVICE, torch.float32)[None].expand(n * len(CASES), -1).contiguous(), args


def test_draws_follow_the_filtered_distribution():
    """The oracle's draws follow each case's distribution (chi-square on 2,000 draws a case), and
    the kernel draws the oracle's tokens with the exact log-probs on a share of the same rows (the
    interpreter runs a program at a time: 12 rows a case on the CPU, all of them on a GPU)."""
    n = 2000  # expected counts >= 2000 * 0.05 = 100
    logits, args = case_rows(n)
    tokens, _ = reference.sample(logits, *args)
    for i, (name, (_, expected)) in enumerate(CASES.items()):
        drawn = tokens[i * n:(i + 1) * n].cpu()
        counts = torch.bincount(drawn, minlength=6).double()
        assert (counts[expected == 0] == 0).all(), f"{name}: drew a filtered token"
        live = expected > 0
        want = expected[live] * n
        chi2 = float(((counts[live] - want) ** 2 / want).sum())
        assert chi2 < 25.7, (f"{name}: chi-square {chi2:.1f} over {int(live.sum()) - 1} dof "
                             f"(p < 1e-4), {counts.tolist()}")
    k = n if DEVICE == "cuda" else 12
    logits, args = case_rows(k)
    kernel_tokens, logprobs = sample_triton(logits, *args)
    ref_tokens, _ = reference.sample(logits, *args)
    assert torch.equal(kernel_tokens, ref_tokens)
    for i, (name, (_, expected)) in enumerate(CASES.items()):
        drawn = kernel_tokens[i * k:(i + 1) * k].cpu()
        got = logprobs[i * k:(i + 1) * k].double().cpu()
        torch.testing.assert_close(got, expected.double().log()[drawn], atol=1e-5, rtol=0,
                                   msg=lambda m: f"{name}: {m}")


def test_greedy_is_the_first_argmax_with_the_model_logprob():
    logits = torch.randn(4, 1031, generator=torch.Generator(DEVICE).manual_seed(3), device=DEVICE)
    logits[1, 7] = logits[1, 900] = logits[1].max() + 1  # a tie for the max: the first index wins
    temperatures, _, _, seeds, positions, min_ps = rows(4, temperature=0.0)
    top_ks = torch.tensor([0, 5, 0, 1], device=DEVICE)
    top_ps = torch.tensor([1.0, 0.1, 0.5, 1.0], device=DEVICE)
    tokens, logprobs = sample_triton(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps)
    assert torch.equal(tokens, logits.argmax(-1)) and tokens[1] == 7
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0])


def test_top_p_zero_keeps_only_the_most_likely_token_wherever_it_is():
    """top_p 0 keeps the most likely token, not token 0: a cut of every token (the mass before the
    first one, 0, is >= 0) would leave an all -inf row whose argmax is token 0, whatever the
    logits."""
    logits = torch.randn(16, 9, generator=torch.Generator(DEVICE).manual_seed(4), device=DEVICE)
    logits[:, 0] = logits.min() - 1  # token 0 never the most likely
    args = rows(16, top_p=0.0)
    for draw in (sample_triton, reference.sample):
        tokens, logprobs = draw(logits, *args)
        assert torch.equal(tokens, logits.argmax(-1)), draw.__name__
        torch.testing.assert_close(logprobs, torch.zeros_like(logprobs))


def test_top_k_at_or_above_the_vocabulary_is_no_filter_and_one_token_vocab():
    logits = torch.randn(3, 9, generator=torch.Generator(DEVICE).manual_seed(5), device=DEVICE)
    args = list(rows(3))
    args[1] = torch.tensor([9, 100, 0], device=DEVICE)
    tokens, logprobs = sample_triton(logits, *args)
    plain, _ = sample_triton(logits, *rows(3))
    assert torch.equal(tokens, plain)
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0])
    tokens, logprobs = sample_triton(torch.randn(2, 1, device=DEVICE), *rows(2, top_k=3, top_p=0.5, min_p=0.5))
    assert tokens.tolist() == [0, 0] and logprobs.abs().max() < 1e-6


def test_a_nan_row_gives_a_nan_logprob_and_a_token_inside_the_vocabulary():
    """NaN logits match no maximum and no score: the token must still index the vocabulary (the
    next step embeds it; past the table it is a device-side assert on a GPU, not the engine's
    NonFiniteError), and the log-prob carries the NaN."""
    logits = torch.randn(4, CHUNK + 37, generator=torch.Generator(DEVICE).manual_seed(8), device=DEVICE)
    logits[:, 3] = float("nan")
    temperatures, top_ks, top_ps, seeds, positions, min_ps = rows(4)
    temperatures[0], top_ks[2], top_ps[3] = 0.0, 5, 0.9  # greedy, plain, top-k, top-p
    tokens, logprobs = sample_triton(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps)
    assert ((tokens >= 0) & (tokens < logits.shape[1])).all(), tokens
    assert logprobs.isnan().all(), logprobs


def test_empty_batch():
    tokens, logprobs = sample_triton(torch.zeros(0, 9, device=DEVICE), *rows(0))
    assert tokens.shape == (0,) and logprobs.shape == (0,) and tokens.device.type == DEVICE


def test_a_row_draws_the_same_token_whatever_else_is_in_the_batch():
    logits, *rest = mixed_batch(CHUNK + 901, torch.bfloat16)
    together = sample_triton(logits, *rest)
    for i in range(8):
        alone = sample_triton(logits[i:i + 1], *(x[i:i + 1] for x in rest))
        assert alone[0].item() == together[0][i].item()
        assert alone[1].item() == together[1][i].item()  # the same chunks, merged the same way


def test_sample_dispatches_by_backend(monkeypatch):
    import fusedrl.kernels.sampling.sampler as sampler

    calls = []  # sample checks its arguments once, then launches past sample_triton's checks
    launch = sampler._sample_triton
    monkeypatch.setattr(sampler, "_sample_triton", lambda *a: calls.append(1) or launch(*a))
    logits, *rest = mixed_batch(7, torch.float32)
    with use_backend("torch"):
        sample(logits, *rest)
    assert calls == []  # the reference
    with use_backend("triton"):
        sample(logits, *rest)
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tie_at_the_top_k_boundary_stays_in_top_p_mass(dtype):
    """bf16 rounding can tie the k-th and (k+1)-th logits (vocab 1031, top-k 7, top-p 0.9): both
    stay in the top-k set and so in the top-p target, in the kernel and its oracle alike, so the two
    cut top-p at the same token."""
    logits = torch.tensor([[3.0, 2.5, 2.0, 2.0, 2.0, 1.0, 0.0]], device=DEVICE).to(dtype).expand(4, -1).contiguous()
    args = rows(4, top_k=3, top_p=0.9, seed0=11)
    tokens, logprobs = sample_triton(logits, *args)
    assert torch.equal(tokens, reference.sample(logits, *args)[0])
    # top-3 keys: 3.0, 2.5 and the three-way tie at 2.0 (5 tokens); top-p 0.9 of their mass keeps them all
    expected = filtered_logprobs(logits, args[0], args[1], args[2], args[5], tokens)
    kept = torch.tensor([3.0, 2.5, 2.0, 2.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(expected, (logits[0, tokens].double() - kept.logsumexp(0)).cpu().to(expected.device))
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-5, rtol=1e-5)


def assert_same_as_the_reference(logits, args):
    """The kernel's tokens are the oracle's and its log-probs the float64 filtered distribution's."""
    temperatures, top_ks, top_ps, seeds, positions, min_ps = args
    tokens, logprobs = sample_triton(logits, *args)
    assert torch.equal(tokens, reference.sample(logits, *args)[0])
    expected = filtered_logprobs(logits, temperatures, top_ks, top_ps, min_ps, tokens)
    torch.testing.assert_close(logprobs.double(), expected, atol=2e-5, rtol=2e-5)
    return tokens, logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_rows_keep_their_whole_tie_in_the_window(dtype):
    """Every token on one key: every cut keeps them all (ties kept). The bracket is that one key
    (the row's total mass bounds the cell's; near 0 the cell's least key bounds its thousands of
    keys), so no row falls back: the finish kernel never reads the logits but for the tokens'."""
    vocab = CHUNK + 901
    logits = torch.full((4, vocab), 0.75, device=DEVICE, dtype=dtype)
    logits[1] = 0.0
    logits[2] = -3.0
    args = rows(4, top_p=0.99, min_p=0.9)
    args[1][0], args[2][0] = 7, 1.0  # top-k alone
    args[2][1], args[2][2] = 0.3, 0.95
    tokens, logprobs = assert_same_as_the_reference(logits, args)
    torch.testing.assert_close(logprobs, torch.full_like(logprobs, -math.log(vocab)))
    loaded = finish_reads(logits, args)
    assert loaded is None or loaded < logits[0].numel() * logits.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_cut_on_a_tie_keeps_the_whole_tie(dtype):
    """Top-k whose k-th key is tied with the next ones, and top-p whose target falls inside a tied
    key's mass: both keep every token of that key, as the oracle does."""
    vocab = 1031
    g = torch.Generator(DEVICE).manual_seed(7)
    logits = (torch.randn(2, vocab, generator=g, device=DEVICE) * 2).round().to(dtype)  # integers: many ties
    keys = logits.float().sort(-1, descending=True).values
    k = int((keys[0] == keys[0, 20]).nonzero()[0]) + 1  # the first token of the 21st token's tie
    scaled = logits.float()
    mass = torch.exp(scaled - scaled.max(-1, keepdim=True).values)
    tie = scaled[1] == keys[1, 20]
    above = mass[1][scaled[1] > keys[1, 20]].sum()
    top_p = float((above + 0.5 * mass[1][tie].sum()) / mass[1].sum())  # halfway through the tie's mass
    args = rows(2)
    args[1][0], args[2][1] = k, top_p
    tokens, _ = assert_same_as_the_reference(logits, args)
    kept = kept_mask(logits, scaled, torch.ones(2, device=DEVICE), args[1], args[2], args[5])
    assert kept[0].sum() > k and kept[0][logits[0].float() == keys[0, 20]].all()
    assert kept[1][tie].all() and not kept[1][scaled[1] < keys[1, 20]].any()


def fallback_rows(dtype):
    """Rows whose bracket does not fit the window: top-k cuts far below the max (temperature 0.05:
    the walk goes through many slices), and top-p and top-k cuts among the near-0 keys (thousands of
    keys in one profile cell; there the cut's tokens weigh as much as the max's)."""
    g = torch.Generator(DEVICE).manual_seed(9)
    vocab = 2 * CHUNK + 5
    deep = torch.randn(2, vocab, generator=g, device=DEVICE) * 3
    near_zero = torch.rand(2, vocab, generator=g, device=DEVICE) * 0.2 - 0.1
    logits = torch.cat([deep, near_zero]).to(dtype)
    on = lambda *v, dtype=torch.float32: torch.tensor(v, dtype=dtype, device=DEVICE)  # noqa: E731
    return logits, (on(0.05, 0.05, 1.0, 1.0), on(vocab // 2, 3000, 0, vocab // 2, dtype=torch.int64),
                    on(1.0, 0.99, 0.5, 1.0), torch.arange(4, device=DEVICE) + 21, torch.full((4,), 5, device=DEVICE),
                    on(0.5, 0.0, 0.0, 0.0))


def finish_reads(logits, args):
    """Bytes the finish kernel loads (its fallback reads the row), or None off the interpreter."""
    if DEVICE != "cpu":
        return None
    from traffic_kernels import KernelTraffic

    with KernelTraffic() as t:
        sample_triton(logits, *args)
    return t.loaded["_finish_kernel"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_fallback_is_exact(dtype):
    logits, args = fallback_rows(dtype)
    assert_same_as_the_reference(logits, args)
    loaded = finish_reads(logits, args)
    assert loaded is None or loaded >= logits.numel() * logits.element_size()  # every row walked by the fallback


@pytest.mark.parametrize("dtype, records", [(torch.bfloat16, 0), (torch.float32, 1), (torch.bfloat16, 3)])
def test_a_cut_between_adjacent_keys_draws_above_it_only(monkeypatch, dtype, records):
    """Two adjacent keys interleaved, top-k = the upper key's tokens: the cut falls between them,
    inside every chunk's window, so a chunk's best candidate is often of the cut key and the upper
    key's best must reach the window too (the records; with fewer rounds, the rest go atomic)."""
    import fusedrl.kernels.sampling.sampler as sampling

    monkeypatch.setattr(sampling, "_RECORDS", records)
    vocab = CHUNK + 901
    # adjacent 16-bit keys (bf16 values; fp32's top 16 bits) in one profile cell (1/16 wide)
    lower, upper = 1.0 + 2.0 ** -7, 1.0 + 2.0 ** -6
    logits = torch.where(torch.arange(vocab, device=DEVICE) % 3 == 0, upper, lower).to(dtype).expand(6, -1).contiguous()
    args = rows(6, top_k=(vocab + 2) // 3, seed0=40)
    tokens, _ = assert_same_as_the_reference(logits, args)
    assert (tokens % 3 == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_bracket_that_misses_falls_back_and_stays_exact(monkeypatch, dtype):
    """Mass bounds made wrong on purpose (slack -0.5): the finish kernel finds the window does not hold
    the cut (the mass above it already reaches the target, or the target is not reached in it) and
    walks the row itself. A bracket costs time when it misses, never the right token."""
    import fusedrl.kernels.sampling.sampler as sampling

    monkeypatch.setattr(sampling, "_SLACK", -0.5)
    g = torch.Generator(DEVICE).manual_seed(10)
    logits = (torch.randn(3, CHUNK + 901, generator=g, device=DEVICE) * 3).to(dtype)
    args = rows(3, top_p=0.9)
    args[1][1] = 40  # top-k and top-p
    args[1][2], args[2][2] = 40, 1.0  # top-k alone: its counts are exact, its window holds the cut
    assert_same_as_the_reference(logits, args)
    loaded = finish_reads(logits, args)
    assert loaded is None or loaded >= 2 * logits[0].numel() * logits.element_size()


def test_mixed_rows_draw_as_they_do_alone():
    """Greedy, plain, top-k, top-p, min-p, a flat row and two fallback rows in one batch: each row's
    token and log-prob are the ones it gets alone (its window is its own)."""
    logits, args = fallback_rows(torch.bfloat16)
    vocab = logits.shape[1]
    mixed, *rest = mixed_batch(vocab, torch.bfloat16)
    flat = torch.zeros(1, vocab, device=DEVICE, dtype=torch.bfloat16)
    on = lambda *v, dtype=torch.float32: torch.tensor(v, dtype=dtype, device=DEVICE)  # noqa: E731
    flat_args = (on(1.0), on(5, dtype=torch.int64), on(0.7), on(3, dtype=torch.int64), on(2, dtype=torch.int64),
                 on(0.0))
    picks = [0, 1, 3, 4, 6]  # greedy, plain, top-k, top-p, top-k + top-p + min-p
    batch = torch.cat([mixed[picks], flat, logits[:2]])
    batch_args = [torch.cat([r[picks], f, a[:2]]) for r, f, a in zip(rest, flat_args, args)]
    together = sample_triton(batch, *batch_args)
    assert torch.equal(together[0], reference.sample(batch, *batch_args)[0])
    for i in range(batch.shape[0]):
        alone = sample_triton(batch[i:i + 1], *(a[i:i + 1] for a in batch_args))
        assert alone[0].item() == together[0][i].item()
        assert alone[1].item() == together[1][i].item()


def test_the_window_workspace_is_left_empty():
    """The caller's window is emptied by the kernels that used it (no clearing op): after calls with
    window rows (fp32: the fixed-point masses too) and fallback rows, every bin is empty again, and
    the next call on it draws as a fresh one does."""
    from fusedrl.kernels.sampling.sampler import SamplerWorkspace

    dtype = torch.float32
    workspace = SamplerWorkspace(8, torch.device(DEVICE))
    logits, args = fallback_rows(dtype)
    args[1][2] = 10  # a window row too
    sample_triton(logits, *args, workspace)  # 4 rows
    assert workspace.is_empty()
    batch = mixed_batch(CHUNK + 901, dtype)  # 8 rows
    reused = sample_triton(*batch, workspace)
    assert workspace.is_empty()
    fresh = sample_triton(*batch)
    assert torch.equal(reused[0], fresh[0]) and torch.equal(reused[1], fresh[1])


BAD_ROWS = {  # (argument index after the logits, bad value, error, message)
    "negative temperature": (0, [1.0, -0.5, 1.0, 1.0], ValueError,
                             r"temperatures must be finite and >= 0 \(0 = greedy\); got 1 out of range \(first: -0.5\)"),
    "nan temperature": (0, [1.0, 1.0, float("nan"), 1.0], ValueError, r"temperatures must be finite and >= 0.*first: nan"),
    "inf temperature": (0, [float("inf")] * 4, ValueError, r"temperatures must be finite and >= 0 .*got 4 out of range \(first: inf\)"),
    "negative top_k": (1, [0, -1, 0, 0], ValueError, r"top_ks must be >= 0 \(0 = off\).*first: -1"),
    "top_p above 1": (2, [1.0, 1.0, 2.0, 1.0], ValueError, r"top_ps must be in \[0, 1\].*first: 2.0"),
    "negative top_p": (2, [-0.1, 1.0, 1.0, 1.0], ValueError, r"top_ps must be in \[0, 1\]"),
    "min_p above 1": (5, [0.0, 1.5, 0.0, 0.0], ValueError, r"min_ps must be in \[0, 1\] \(0 = off\).*first: 1.5"),
    "short temperatures": (0, [1.0] * 3, ValueError, r"temperatures must have shape \(4,\) \(one per row of logits\), got \(3,\)"),
    "long seeds": (3, list(range(5)), ValueError, r"seeds must have shape \(4,\).*got \(5,\)"),
    "int32 top_ks": (1, torch.zeros(4, dtype=torch.int32), TypeError, r"top_ks must have dtype in \(int64\), got torch.int32"),
    "fp64 top_ps": (2, torch.ones(4, dtype=torch.float64), TypeError, r"top_ps must have dtype in \(float32\)"),
    "positions elsewhere": (4, torch.zeros(4, dtype=torch.int64, device="meta"), ValueError,
                            r"positions is on meta but logits are on"),
}


@pytest.mark.parametrize("sampler", ["sample", "sample_triton"])
@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_per_row_arguments_are_named(case, sampler, monkeypatch):
    """Each per-row tensor is [B] of its documented dtype on the logits' device, and (sync checks on,
    as on the CPU) in its range: before any kernel reads it (a short one would be read past its end)."""
    monkeypatch.setenv("FUSEDRL_SYNC_CHECKS", "1")  # the values are read on a GPU too
    index, value, error, match = BAD_ROWS[case]
    args = list(rows(4))
    args[index] = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=args[index].dtype, device=DEVICE)
    fn = sample if sampler == "sample" else sample_triton
    for backend in ("torch", "triton") if sampler == "sample" else ("triton",):
        with use_backend(backend), pytest.raises(error, match=f"{sampler}: {match}"):
            fn(torch.randn(4, 9, device=DEVICE), *args)


def test_bad_logits_are_named():
    with pytest.raises(TypeError, match=r"sample: logits must have dtype in \(float32, bfloat16, float16\), got torch.float64"):
        sample(torch.randn(4, 9, dtype=torch.float64, device=DEVICE), *rows(4))
    with pytest.raises(ValueError, match=r"sample: logits must have shape \[B, V\] with V >= 1, got \(4, 0\)"):
        sample(torch.zeros(4, 0, device=DEVICE), *rows(4))


def test_a_workspace_too_small_or_elsewhere_is_refused():
    from fusedrl.kernels.sampling.sampler import SamplerWorkspace

    logits, *rest = mixed_batch(7, torch.float32)
    with pytest.raises(ValueError, match="workspace of 2 rows on .* for 8 rows of logits"):
        sample_triton(logits, *rest, SamplerWorkspace(2, torch.device(DEVICE)))
    with pytest.raises(ValueError, match="rows=0 must be an int >= 1"):
        SamplerWorkspace(0, torch.device(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_extreme_inverse_temperature_draws_the_argmax_without_warnings(dtype):
    """Temperature 1e-8 on logits +-1e4: scaled logits near +-1e12, so profile cells far below the
    chunk's top cell (clamped to +-2^30) would land at negative depths; clamped at 0, the
    histogram's bins stay in range (undefined on a GPU, an invalid cast warning in the
    interpreter)."""
    g = torch.Generator(DEVICE).manual_seed(6)
    logits = (torch.randint(0, 2, (4, CHUNK + 37), generator=g,
                            device=DEVICE) * 2e4 - 1e4).to(dtype)
    logits[:, 0] = -1e4
    winners = torch.tensor([5, 300, CHUNK + 3, 0], device=DEVICE)
    logits[torch.arange(4, device=DEVICE), winners] = 2e4 if dtype == torch.float32 else 1.5e4
    args = list(rows(4, temperature=1e-8, top_k=50, top_p=0.9))
    for draw in (sample_triton, reference.sample):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tokens, logprobs = draw(logits, *args)
        assert torch.equal(tokens, winners), draw.__name__
        torch.testing.assert_close(logprobs, torch.zeros_like(logprobs))


@needs_triton
def test_workspace_left_unwritten_is_never_read(monkeypatch):
    """The sampler's workspace comes from torch.empty, whose memory holds whatever was there: a
    chunk writes its plain-draw slots (best Gumbel score, its token) for plain rows only, so the
    merge must not read them for greedy or cut rows. Poisoned with NaN (and -1 for ints), a mixed
    batch draws what a clean one draws, with no warning."""
    batch = mixed_batch(CHUNK + 5, torch.float32)  # 2 chunks a row: no masked lane beside them
    clean = sample_triton(*batch)
    empty = torch.empty

    def poisoned(*size, dtype=None, **kwargs):
        out = empty(*size, dtype=dtype, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -1)
    monkeypatch.setattr(torch, "empty", poisoned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens, logprobs = sample_triton(*batch)
    monkeypatch.undo()
    assert torch.equal(tokens, clean[0])
    torch.testing.assert_close(logprobs, clean[1], rtol=0, atol=0)
