"""The exact (batch-invariant) mode's attention, public as `fusedrl.kernels.exact.attention`: the
segment kernel (segment_attention.py) where the model's kernels run, the page-by-page torch
reduction (chunked_attention.py) elsewhere. Both read keys through a page table of key rows and
compute each query's result in an order that does not depend on the rest of the batch."""
from __future__ import annotations

import torch

from ..dispatch import fused_for_model
from .chunked_attention import chunked_attention
from .segment_attention import segment_attention


def exact_attention(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                    positions: torch.Tensor, seq_index: torch.Tensor, page_table: torch.Tensor,
                    page: int, segment: int, max_position: int) -> torch.Tensor:
    """Causal attention of each query over its sequence's keys 0..position, read through a page
    table: q [N, H, D], k_rows/v_rows [rows, Hkv, D], positions/seq_index [N] int64, page_table [S,
    W] int32, `page` keys a page, `segment` keys per segment of the Triton kernel (a power of two >=
    16; the torch path reduces page by page), max_position a host int >= every position -> [N, H,
    D]."""
    if fused_for_model(q):
        return segment_attention(q, k_rows, v_rows, positions, seq_index, page_table, page, segment,
                                 max_position)
    return chunked_attention(q, k_rows, v_rows, positions, seq_index, page_table, page)
