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
