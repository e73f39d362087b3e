"""The one masked mean / moments / whiten (kernels.rl.statistics, under reference's names), used by the ops,
group_advantages and the engine's rollout statistics: against float64 formulas written out, and with
`sum_over` (the ranks' all-reduce) two shards give the statistics of their concatenation."""
import threading

import pytest
import torch

from fusedrl.kernels import reference


def two_rank_sum():
    """sum_over for two threads standing in for two ranks: each call returns the sum of both
    threads' tensors of the same call (an all-reduce)."""
    barrier, slots = threading.Barrier(2), {}

    def sum_over(rank, t):
        slots[rank] = t
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()                                                     # both read before the next call
        return total
    return sum_over


def on_two_ranks(fn, shards):
    """fn(shard, sum_over) run on each shard in its own thread -> the two results."""
    sum_over, results = two_rank_sum(), [None, None]

    def run(rank):
        results[rank] = fn(shards[rank], lambda t: sum_over(rank, t))
    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (4, 9), (3, 1001)])
def test_moments_match_the_formulas(shape, unbiased):
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 5
    mask = torch.rand(shape, generator=g) < 0.7
    mask.view(-1)[0] = True
    x[~mask] = float("inf")                                                # masked entries never count
    valid = x[mask]
    mean, var = reference.masked_moments(x, mask, unbiased=unbiased)
    expected_var = ((valid - valid.mean()) ** 2).sum() / max(valid.numel() - int(unbiased), 1)
    assert mean.shape == (1, 1) and var.shape == (1, 1)
    assert mean.item() == pytest.approx(valid.mean().item(), rel=1e-12)
    assert var.item() == pytest.approx(expected_var.item(), rel=1e-12)
    assert reference.masked_mean(x, mask).item() == pytest.approx(valid.mean().item(), rel=1e-12)


def test_moments_along_a_dim_and_empty_rows():
    x = torch.tensor([[1.0, 2.0, 4.0], [5.0, 0.0, 0.0], [3.0, 3.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [False, False, False], [True, False, True]])
    mean, var = reference.masked_moments(x, mask, dim=1)
    assert mean.squeeze(1).tolist() == pytest.approx([7 / 3, 0.0, 3.0])
    assert var.squeeze(1).tolist() == pytest.approx([(16 + 1 + 25) / 9 / 2, 0.0, 0.0])
    assert reference.masked_mean(x, mask, dim=1).tolist() == pytest.approx([7 / 3, 0.0, 3.0])


@pytest.mark.parametrize("sizes", [(5, 8), (1, 13), (0, 6)])
def test_sum_over_two_ranks_equals_the_concatenation(sizes):
    g = torch.Generator().manual_seed(sum(sizes))
    shards = [torch.randn(n, 7, generator=g, dtype=torch.float64) for n in sizes]
    masks = [torch.rand(n, 7, generator=g) < 0.6 for n in sizes]
    x, mask = torch.cat(shards), torch.cat(masks)
    mean, var = reference.masked_moments(x, mask)
    white = reference.masked_whiten(x, mask)
    pairs = list(zip(shards, masks))
    moments = on_two_ranks(lambda s, so: reference.masked_moments(*s, sum_over=so), pairs)
    whitened = on_two_ranks(lambda s, so: reference.masked_whiten(*s, sum_over=so), pairs)
    for rank_mean, rank_var in moments:
        assert rank_mean.item() == pytest.approx(mean.item(), rel=1e-12)
        assert rank_var.item() == pytest.approx(var.item(), rel=1e-12)
    torch.testing.assert_close(torch.cat(whitened), white, rtol=1e-12, atol=1e-12)
