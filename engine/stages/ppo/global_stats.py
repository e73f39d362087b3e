"""Statistics of a rollout whose rows are split over the ranks (each rank holds R rows of the
global W * R, in rank order): every rank gets the value one process would compute on the whole
rollout. Per-token tensors are [R, T] with T each rank's own longest response, so statistics go
through sums and counts, never through concatenated grids. With one process these are the plain
statistics (whitening exactly the kernel's).

Every statistic is a 0-dim float64 tensor on the device: an iteration's metrics are read with one
host sync (`read`), not one per statistic.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ....kernels import masked_whiten, reference
from ... import distributed


def _sum(*values: torch.Tensor) -> torch.Tensor:
    """[len(values)] float64: each 0-dim value summed over the ranks (one all-reduce, on the device)."""
    stacked = torch.stack([v.double() for v in values])
    return stacked if distributed.world_size() == 1 else distributed.all_reduce_tensor(stacked)


def _sum_over():
    """The ranks' all-reduce for kernels.reference's sums (None in one process: no copy)."""
    return None if distributed.world_size() == 1 else distributed.all_reduce_tensor


def read(values: dict) -> dict:
    """{name: 0-dim tensor or Python number} -> {name: float or the number}: one host sync for all
    the tensors."""
    names = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    if not names:
        return dict(values)
    host = torch.stack([values[k].detach().double().reshape(()) for k in names]).tolist()
    return {**values, **dict(zip(names, host))}


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """[R, ...] on each rank -> [W * R, ...], rank 0's rows first (the same R on every rank)."""
    if distributed.world_size() == 1:
        return x
    parts = [torch.empty_like(x, device="cpu") for _ in range(distributed.world_size())]
    dist.all_gather(parts, x.detach().cpu().contiguous())
    return torch.cat(parts).to(x.device)


def own_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a gathered [W * R, ...] tensor."""
    return x[distributed.rank_slice(x.shape[0] // distributed.world_size())]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over valid entries of all ranks (0 when there are none)."""
    return reference.masked_mean(x.double(), mask, sum_over=_sum_over())


def total(x: torch.Tensor) -> torch.Tensor:
    """Sum of all of x's entries over all ranks."""
    return _sum(x.sum())[0]


def row_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a per-row [R] tensor over all ranks' rows."""
    return masked_mean(x, torch.ones_like(x, dtype=torch.bool))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance over valid entries of all ranks (two passes: the mean, then centered squares; the
    denominator at least 1)."""
    return reference.masked_moments(x.double(), mask, unbiased=unbiased, sum_over=_sum_over())[1]


def row_std(x: torch.Tensor) -> torch.Tensor:
    """Population std of a per-row [R] tensor over all ranks' rows."""
    return masked_var(x, torch.ones_like(x, dtype=torch.bool)) ** 0.5


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    local = torch.where(mask, x.double(), float("-inf")).max()
    return local if distributed.world_size() == 1 else distributed.all_reduce_tensor(local, op="max")


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """kernels.masked_whiten with the mean and unbiased variance of all ranks' valid entries."""
    if distributed.world_size() == 1:
        return masked_whiten(x, mask)
    return reference.masked_whiten(x.double(), mask, eps=eps, sum_over=distributed.all_reduce_tensor).float()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over all ranks' valid tokens (NaN if returns are constant)."""
    ret_var = masked_var(returns, mask)
    ratio = masked_var(returns - values, mask) / ret_var
    return torch.where(ret_var > 0, 1.0 - ratio, float("nan"))
