"""kernels.rl.statistics, the one module of masked statistics: against float64 formulas written out on
odd shapes, masked rows and empty inputs; and with `sum_over` the sum over 2 gloo processes, each
holding some of the rows, every rank gets one process's statistics of all the rows."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from fusedrl.kernels import (explained_variance, group_advantages, importance_weights, masked_mean, masked_moments,
                             masked_whiten)
from fusedrl.kernels.rl import statistics
from fusedrl.engine.parallel import distributed


def whiten_by_hand(x: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """Float64 whitening over the valid entries, written out entry by entry."""
    values = [float(v) for v, ok in zip(x.flatten().tolist(), mask.flatten().tolist()) if ok]
    mean = sum(values) / max(len(values), 1)
    var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    white = [(v - mean) / math.sqrt(var + eps) if ok else 0.0
             for v, ok in zip(x.flatten().tolist(), mask.flatten().tolist())]
    return torch.tensor(white, dtype=torch.float64).view(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (7, 129), (0, 5)])
def test_whiten_matches_the_formula(shape, dtype):
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 5)
    mask = torch.rand(shape, generator=g) < 0.7
    if shape[0] > 2:
        mask[1] = False                                                      # a fully masked row
    dirty = x.masked_fill(~mask, float("nan")).to(dtype)                     # masked entries never count
    white = statistics.masked_whiten(dirty, mask, eps=1e-8)
    assert white.dtype == dtype and white.shape == shape
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(white.double(), whiten_by_hand(x.to(dtype).double(), mask, 1e-8), **tol)


def test_means_along_a_dim_keep_empty_rows_at_zero():
    x = torch.tensor([[1.0, 2.0, 4.0, 9.0], [5.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.uint8)
    assert masked_mean(x, mask, dim=1, keepdim=True).shape == (3, 1)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([7 / 3, 0.0, 3.0])
    assert masked_mean(x, mask, dim=0).tolist() == pytest.approx([2.0, 2.0, 3.5, 0.0])
    assert masked_mean(x).item() == pytest.approx(x.mean().item())          # no mask: every entry
    mean, var = masked_moments(x, mask, dim=1, unbiased=False)
    assert var.squeeze(1).tolist() == pytest.approx([(16 + 1 + 25) / 9 / 3, 0.0, 0.0])
    empty = torch.zeros(0, 4)
    assert masked_mean(empty, empty.bool()).item() == 0.0
    assert [t.item() for t in masked_moments(empty, empty.bool())] == [0.0, 0.0]


def test_low_precision_inputs_are_summed_in_float32():
    # 4096 ones and a 1 in bf16: a bf16 running sum stalls at 256; the mean must be 1 exactly.
    x = torch.ones(4097, dtype=torch.bfloat16)
    assert masked_mean(x, torch.ones_like(x, dtype=torch.bool)).item() == 1.0


def test_explained_variance_by_hand():
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    # returns - values = [0, 1, -1]: population variance 2/3 against the returns' 2/3 -> 0
    values = torch.tensor([[1.0, 1.0, 4.0, 0.0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), mask))


def test_one_rank_sum_changes_neither_value_nor_gradient():
    # A sum over one rank is the identity: the statistic and its gradient are the local ones.
    x = torch.randn(4, 9, requires_grad=True)
    mask = torch.rand(4, 9) > 0.3
    plain = statistics.masked_whiten(x, mask)
    torch.autograd.backward(plain, torch.arange(36.0).view(4, 9))
    expected, x.grad = x.grad, None
    summed = statistics.masked_whiten(x, mask, sum_over=lambda t: t.clone())
    torch.autograd.backward(summed, torch.arange(36.0).view(4, 9))
    torch.testing.assert_close(summed, plain)
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("op", [masked_mean, masked_moments])
def test_a_mask_of_another_shape_or_device_is_refused(op):
    # torch.where would broadcast a [1, 5] mask over both rows where the count does not: a mean of 2.
    name = op.__name__
    with pytest.raises(ValueError, match=rf"{name}: mask must have the shape of x \(2, 5\), got \(1, 5\)"):
        op(torch.ones(2, 5), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=rf"{name}: mask must have the shape of x \(2, 5\), got \(5,\)"):
        op(torch.ones(2, 5), torch.ones(5))
    with pytest.raises(ValueError, match=rf"{name}: mask is on meta but x is on cpu"):
        op(torch.ones(2, 5), torch.ones(2, 5, dtype=torch.bool, device="meta"))
    with pytest.raises(TypeError, match=rf"{name}: mask must be bool, integer or float"):
        op(torch.ones(2, 5), torch.ones(2, 5, dtype=torch.complex64))
    float_mask = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]] * 2)         # TRL's completion_mask: nonzero = valid
    x = torch.arange(10.0).view(2, 5)
    torch.testing.assert_close(op(x, float_mask), op(x, float_mask != 0), rtol=0, atol=0)


def test_explained_variance_refuses_shapes_that_would_broadcast():
    returns = torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"explained_variance: values must have the shape of returns \(2, 5\), "
                                         r"got \(2, 1\)"):
        explained_variance(torch.randn(2, 1), returns, None)
    with pytest.raises(ValueError, match=r"explained_variance: mask must have the shape of returns"):
        explained_variance(returns, returns, torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"explained_variance: values must have dtype in"):
        explained_variance(returns.long(), returns, None)


def is_args(**changes):
    args = dict(old_logp=torch.randn(2, 5), rollout_logp=torch.randn(2, 5), mask=torch.ones(2, 5, dtype=torch.bool),
                mode="mis", level="token", cap=2.0, low=0.5, high=2.0)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, error, match", [
    (dict(mode="x"), ValueError, r"importance_weights: unknown mode 'x'; expected one of \('tis', 'mis'\)"),
    (dict(level="tokn"), ValueError, r"importance_weights: unknown level 'tokn'; expected one of"),
    (dict(rollout_logp=torch.randn(2, 1)), ValueError,
     r"importance_weights: rollout_logp must have the shape of old_logp \(2, 5\), got \(2, 1\)"),
    (dict(mask=torch.ones(5, dtype=torch.bool)), ValueError, r"importance_weights: mask must have the shape of old_logp"),
    (dict(mask=None), TypeError, r"importance_weights: mask must be a torch.Tensor, got NoneType"),
    (dict(rollout_logp=torch.zeros(2, 5, dtype=torch.long)), TypeError, r"importance_weights: rollout_logp must have dtype"),
    (dict(low=1.5), ValueError, r"importance_weights: need 0 < low <= 1 <= high and cap >= 1, got low=1.5"),
    (dict(cap=0.5), ValueError, r"importance_weights: need 0 < low <= 1 <= high and cap >= 1, got .*cap=0.5"),
])
def test_importance_weights_checks_its_arguments(changes, error, match):
    with pytest.raises(error, match=match):
        importance_weights(**is_args(**changes))


def test_bad_sum_over_is_named():
    with pytest.raises(TypeError, match="sum_over: expected None, a function or a torch.distributed.ProcessGroup, "
                                        "got str"):
        masked_mean(torch.ones(3), sum_over="world")


# ---- 2 gloo ranks against 1 process -----------------------------------------------------------

# Rows of rank 0 and rank 1, and their prompt groups of reinforce_pp_baseline: uneven (the statistics
# go through sums and counts), and a rank with none (it still joins the sums).
SPLITS = {"uneven": ((3, 5), (2, 1)), "one_rank_empty": ((0, 8), (0, 3))}
N = 4                   # responses per prompt


def rank_data():
    g = torch.Generator().manual_seed(7)
    rows = 8
    x = torch.randn(rows, 37, generator=g) * 2 + 3
    mask = torch.rand(rows, 37, generator=g) < 0.6
    mask[4] = False                                                        # a fully masked row of rank 1
    values = x + 0.5 * torch.randn(rows, 37, generator=g)
    scores = torch.rand(3, N, generator=g)
    return {"x": x, "mask": mask, "values": values, "scores": scores}


def statistics_of(data, sum_over):
    """Every pooled statistic of the module, on what this process holds."""
    x, mask = data["x"], data["mask"]
    mean, var = masked_moments(x, mask, sum_over=sum_over)
    return {"mean": masked_mean(x, mask, sum_over=sum_over), "moments_mean": mean, "var": var,
            "white": masked_whiten(x, mask, sum_over=sum_over),
            "white_scale": masked_whiten(x, mask, shift_mean=False, sum_over=sum_over),
            "explained_variance": explained_variance(data["values"], x, mask, sum_over=sum_over),
            "advantages": group_advantages(data["scores"], estimator="reinforce_pp_baseline", sum_over=sum_over)}


def _rank_main(rank: int, directory: str, split: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=2)
    data = load_file(f"{directory}/data.safetensors")
    rows, groups = SPLITS[split]
    first_row, first_group = sum(rows[:rank]), sum(groups[:rank])
    mine = {name: t[first_row:first_row + rows[rank]] for name, t in data.items() if name != "scores"}
    mine["scores"] = data["scores"][first_group:first_group + groups[rank]]

    def all_reduce(t):
        out = t.clone()
        dist.all_reduce(out)
        return out
    out = {f"fn.{k}": v for k, v in statistics_of(mine, all_reduce).items()}
    out.update({f"group.{k}": v for k, v in statistics_of(mine, dist.group.WORLD).items()})
    save_file({k: v.contiguous() for k, v in out.items()}, f"{directory}/rank-{rank}.safetensors")
    distributed.leave(0)


@pytest.mark.parametrize("split", SPLITS)
def test_sum_over_two_gloo_ranks_is_one_process(tmp_path, split):
    # Under TRITON_INTERPRET=1 masked_whiten runs its Triton kernels in both, elsewhere the torch path.
    data = rank_data()
    save_file({k: v.contiguous() for k, v in data.items()}, str(tmp_path / "data.safetensors"))
    mp.start_processes(_rank_main, args=(str(tmp_path), split), nprocs=2, start_method="spawn")
    one = statistics_of(data, None)
    ranks = [load_file(tmp_path / f"rank-{r}.safetensors") for r in (0, 1)]
    for kind in ("fn", "group"):                               # a function and a process group as sum_over
        for name, expected in one.items():
            got = [r[f"{kind}.{name}"] for r in ranks]
            if name in ("white", "white_scale", "advantages"):   # per row: each rank has its own rows
                got = [torch.cat(got)]
            for value in got:
                # fp32 rounding: the ranks sum their partial sums in another order than one process
                torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-5, msg=f"{kind}.{name}")
