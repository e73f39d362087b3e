"""kernels.rl.statistics' loss aggregation rules (written once) against the rules written out row
by row in float64, and the property the engine's micro-batches rely on: a minibatch cut into pieces,
each weighted by its share of the aggregation units, sums to the whole minibatch's loss."""
import pytest
import torch

from fusedrl.kernels import aggregate, aggregation_rule, reference
from fusedrl.kernels.rl.statistics import AGGS, row_weights


def rules_by_hand(mask: torch.Tensor, agg: str, norm=None) -> list[float]:
    """The weight of each row's valid tokens, from the definitions, one row at a time."""
    lengths = [int(row.sum()) for row in mask.reshape(-1, mask.shape[-1])]
    tokens, seqs = sum(lengths), sum(n > 0 for n in lengths)
    if agg == "token-mean":
        return [1.0 / max(tokens, 1)] * len(lengths)
    if agg == "seq-mean-token-mean":
        return [1.0 / (max(seqs, 1) * max(n, 1)) for n in lengths]
    if agg == "seq-mean-token-sum":
        return [1.0 / max(seqs, 1)] * len(lengths)
    if agg == "token-sum":
        return [1.0] * len(lengths)
    return [1.0 / (norm or mask.shape[-1])] * len(lengths)


def random_mask(rows: int, t: int, generator) -> torch.Tensor:
    mask = torch.rand(rows, t, generator=generator) < 0.6
    if rows > 1:
        mask[1] = False                                                    # an empty row
    return mask


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("rows, t", [(1, 1), (5, 13), (9, 37)])
@pytest.mark.parametrize("norm", [None, 7.0])
def test_row_weights_follow_the_rules(agg, rows, t, norm):
    g = torch.Generator().manual_seed(rows * 100 + t)
    for mask in (random_mask(rows, t, g), torch.zeros(rows, t, dtype=torch.bool)):
        weights = row_weights(mask, agg, norm)
        assert weights.dtype == torch.float32 and weights.shape == (rows,)
        assert weights.double().tolist() == pytest.approx(rules_by_hand(mask, agg, norm), rel=1e-6)


@pytest.mark.parametrize("agg", AGGS)
def test_leading_dims_are_rows(agg):
    mask = random_mask(6, 11, torch.Generator().manual_seed(3))
    assert torch.equal(row_weights(mask.view(2, 3, 11), agg), row_weights(mask, agg))


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("cut", [[4], [1, 5], [2, 3, 6]])
def test_pieces_weighted_by_their_units_sum_to_the_whole(agg, cut):
    # What engine/stages/ppo/update.py does per micro-batch: the piece's own aggregate times the
    # piece's units over the minibatch's (1 for the sums).
    g = torch.Generator().manual_seed(len(cut))
    mask = random_mask(8, 17, g)
    loss = torch.randn(8, 17, generator=g, dtype=torch.float64)
    whole = reference.aggregate(loss, mask, agg, norm=17)
    _, units = aggregation_rule(mask, agg)
    total = None if units is None else units.double().sum().clamp_min(1)
    pieces = 0.0
    for start, end in zip([0] + cut, cut + [8]):
        share = 1.0 if units is None else units[start:end].double().sum() / total
        pieces = pieces + reference.aggregate(loss[start:end], mask[start:end], agg, norm=17) * share
    assert float(pieces) == pytest.approx(float(whole), rel=1e-6, abs=1e-9)  # fp32 weights


def test_unknown_agg_is_named():
    with pytest.raises(ValueError, match="unknown agg 'seq-mean'"):
        aggregation_rule(torch.ones(2, 3, dtype=torch.bool), "seq-mean")


@pytest.mark.parametrize("agg", AGGS)
def test_aggregate_refuses_a_mask_that_would_broadcast(agg):
    # A [1, 5] mask over [2, 5] tokens: one row of weights for two rows of tokens.
    with pytest.raises(ValueError, match=r"aggregate: mask must have the shape of per_token \(2, 5\), got \(1, 5\)"):
        aggregate(torch.ones(2, 5), torch.ones(1, 5, dtype=torch.bool), agg)
    with pytest.raises(ValueError, match=r"aggregate: mask must have the shape of per_token \(2, 5\), got \(5,\)"):
        aggregate(torch.ones(2, 5), torch.ones(5, dtype=torch.bool), agg)


@pytest.mark.parametrize("call, error, match", [
    (lambda: aggregate(torch.ones(2, 5), None, "seq-mean"), ValueError, "aggregate: unknown agg 'seq-mean'"),
    (lambda: aggregate(torch.ones(2, 5, dtype=torch.long), None, "token-sum"), TypeError,
     "aggregate: per_token must have dtype in"),
    (lambda: aggregate(torch.ones(()), None, "token-sum"), ValueError,
     r"aggregate: per_token must have shape \[..., T\], got \(\)"),
    (lambda: aggregate(torch.ones(2, 5), None, "seq-mean-token-sum-norm", -3.0), ValueError,
     "aggregate: norm must be a positive number, got -3.0"),
    (lambda: aggregation_rule(torch.ones(2, 3, dtype=torch.complex64), "token-mean"), TypeError,
     "aggregation_rule: mask must have dtype in"),
    (lambda: aggregation_rule(torch.ones((), dtype=torch.bool), "token-mean"), ValueError,
     r"aggregation_rule: mask must have shape \[..., T\], got \(\)"),
    (lambda: aggregation_rule(torch.ones(2, 3, dtype=torch.bool), "seq-mean-token-sum-norm", 0.0), ValueError,
     "aggregation_rule: norm must be a positive number, got 0.0"),
])
def test_bad_aggregation_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
