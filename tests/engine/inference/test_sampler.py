"""Sampling: exact distributions, filters, log-probs, and seeded reproducibility.

The noise is a pure function of (seed, position, token), so every statistical check below is
deterministic: the same seeds give the same counts on every run.
"""
import pytest
import torch

from fusedrl.kernels import sample
from fusedrl.kernels.reference.sampling import gumbel_noise, kept_mask

PROBS = torch.tensor([0.4, 0.3, 0.2, 0.1])
N = 40_000


def draw(probs=PROBS, n=N, temperature=1.0, top_k=0, top_p=1.0, seed0=0, position=3):
    logits = probs.log()[None].repeat(n, 1)
    return sample(logits, torch.full((n,), temperature), torch.full((n,), top_k),
                  torch.full((n,), top_p), torch.arange(seed0, seed0 + n), torch.full((n,), position))


def frequencies(tokens, vocab=4):
    return torch.bincount(tokens, minlength=vocab).float() / tokens.numel()


def assert_frequencies(tokens, expected):
    # Binomial standard error at N=40k is <= 0.0025; 0.01 is four of them.
    torch.testing.assert_close(frequencies(tokens), expected, atol=0.01, rtol=0)


def test_plain_sampling_follows_the_distribution():
    tokens, logprobs = draw()
    assert_frequencies(tokens, PROBS)
    torch.testing.assert_close(logprobs, PROBS.log()[tokens])


def test_temperature_sharpens_and_logprobs_are_under_the_scaled_distribution():
    tokens, logprobs = draw(temperature=0.5)
    expected = PROBS ** 2 / (PROBS ** 2).sum()
    assert_frequencies(tokens, expected)
    torch.testing.assert_close(logprobs, expected.log()[tokens])


def test_top_k_renormalizes_over_the_k_most_likely():
    tokens, logprobs = draw(top_k=2)
    expected = torch.tensor([0.4, 0.3, 0.0, 0.0]) / 0.7
    assert_frequencies(tokens, expected)
    torch.testing.assert_close(logprobs, expected.log()[tokens])


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.4 < 0.65 -> keep the 0.3 token too (0.7 >= 0.65); tokens with 0.2, 0.1 are cut.
    tokens, logprobs = draw(top_p=0.65)
    expected = torch.tensor([0.4, 0.3, 0.0, 0.0]) / 0.7
    assert_frequencies(tokens, expected)
    torch.testing.assert_close(logprobs, expected.log()[tokens])


def test_tiny_top_p_still_keeps_the_most_likely_token():
    tokens, _ = draw(top_p=0.01, n=100)
    assert (tokens == 0).all()


def test_greedy_takes_argmax_and_reports_model_logprob():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    tokens, logprobs = sample(logits, torch.zeros(2), torch.tensor([1, 0]), torch.tensor([1.0, 0.5]),
                              torch.tensor([1, 2]), torch.tensor([0, 0]))
    assert tokens.tolist() == [1, 0]
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])


def test_mixed_batch_rows_are_independent_of_each_other():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    temps = torch.tensor([0.0, 1.0, 0.7, 1.3, 0.0, 1.0])
    top_ks = torch.tensor([0, 5, 0, 10, 3, 0])
    top_ps = torch.tensor([1.0, 1.0, 0.9, 0.8, 1.0, 0.5])
    seeds = torch.arange(6) * 1000 + 7
    positions = torch.arange(6) + 11
    batch = sample(logits, temps, top_ks, top_ps, seeds, positions)
    for i in range(6):
        alone = sample(*(t[i:i + 1] for t in (logits, temps, top_ks, top_ps, seeds, positions)))
        assert alone[0].item() == batch[0][i].item()
        torch.testing.assert_close(alone[1], batch[1][i:i + 1])


def test_noise_depends_on_seed_and_position_only():
    a = gumbel_noise(torch.tensor([5, 5, 6]), torch.tensor([1, 2, 1]), 100)
    b = gumbel_noise(torch.tensor([5]), torch.tensor([1]), 100)
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert torch.isfinite(a).all()


def test_noise_is_standard_gumbel():
    noise = gumbel_noise(torch.arange(200), torch.zeros(200, dtype=torch.int64), 1000).flatten()
    # Gumbel(0, 1): mean = Euler-Mascheroni 0.5772, variance pi^2 / 6 = 1.6449; 200k draws.
    assert abs(noise.mean().item() - 0.5772) < 0.01
    assert abs(noise.var().item() - 1.6449) < 0.03


@pytest.mark.parametrize("seed0", [0, 10**12])
def test_different_seeds_give_different_draws(seed0):
    tokens, _ = draw(n=200, seed0=seed0)
    assert len(set(tokens.tolist())) == 4


def test_rows_without_filters_keep_their_whole_vocabulary_in_a_filtered_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5000, generator=g) * 4  # peaked rows: cumulative mass hits 1.0 early
    kept = kept_mask(logits, logits, torch.ones(4), torch.tensor([0, 10, 0, 0]), torch.tensor([1.0, 1.0, 0.5, 1.0]),
                     torch.zeros(4))
    assert kept[[0, 3]].all()
    assert kept[1].sum() == 10
    assert 1 <= kept[2].sum() < 5000
