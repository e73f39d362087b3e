"""Plain PyTorch references of the mixture-of-experts ops (re-exported by the package): the oracle
of moe_permute.py's kernels and the "torch" backend. Indexing and a sum, differentiated by autograd;
float64 inputs stay float64."""
from __future__ import annotations

import torch


def moe_permute(x, order, top_k):
    """x [T, H], order [T*k] -> rows [T*k, H], rows[j] = x[order[j] // top_k]."""
    return x[order // top_k]


def moe_unpermute(y, slot_rows, weights):
    """y [T*k, H], slot_rows [T*k], weights [T, k] -> [T, H]: each token's k rows of y weighted and
    summed in fp32 (float64 for float64 inputs), returned in y's dtype."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    rows = y[slot_rows].to(acc).view(*weights.shape, y.shape[-1])  # [T, k, H]
    return (rows * weights.to(acc)[..., None]).sum(1).to(y.dtype)


def grouped_linear(x, weight, offsets):
    """x [R, K] rows grouped by expert, weight [E, O, K], offsets [E] int32 (each group's end row)
    -> [R, O]: one matmul per group, the bounds read on the host (the CPU's path when torch has no
    grouped_mm; a sync per call on a GPU)."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    return torch.cat([x[s:e] @ weight[g].T for g, (s, e) in enumerate(zip(starts, ends))]
                     + [x.new_zeros(0, weight.shape[1])])
