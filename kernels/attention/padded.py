"""Loop-free attention over many sequences with plain SDPA: the portable path (CPU, and CUDA without
a varlen kernel for the dtype).

Sequences are grouped by the powers of two just above their query and key lengths, and padded to
them: a sequence's SDPA shape, and so its rounding, is the same in any batch (a training forward
equals the scoring forward of the same rows over another batch). One gather per tensor lays every
group out as a right-padded batch ([b, Wq, H, D] queries, [b, Wk, Hkv, D] keys),
each group runs as one SDPA call, and one more gather puts the rows back in pack order. The number
of calls is the number of groups: at most (ceil(log2(longest query)) + 1) x (ceil(log2(longest key))
+ 1), in practice 1-3, and it does not grow with the number of sequences. Rounding to powers of two
bounds a group's padded work at 4x its real work (2x per side), where a [tile, tile] block-diagonal
mask wastes tile / length (10x for 100-token sequences in a 1k tile).

Query r of a sequence with Lq new tokens out of Lk sits at position Lk - Lq + r and sees keys
0..Lk - Lq + r. Right padding puts the padded keys past every real row's last key, so a group with
no cached prefix needs no mask at all and runs SDPA's causal kernel (forward and backward).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .pages import key_slots


@dataclass
class _Group:
    """Sequences that run as one padded SDPA call."""

    num_seqs: int
    width_q: int  # the group's power of two at or above its query lengths
    width_k: int  # the same for its key lengths
    # [b] Lk - Lq (cached prefix), on device; None when all are 0
    query_offsets: torch.Tensor | None


@dataclass
class PaddedPlan:
    """How a batch of sequences runs as padded groups; built once per forward, shared by the layers.

    Index tensors live on the attention's device; "padded rows" are the groups' [b, W] rows laid end
    to end.
    """

    groups: list[_Group]
    q_rows: torch.Tensor  # [sum b * Wq] pack row of each padded query (pads repeat a real row)
    key_seq_ids: torch.Tensor  # [sum b * Wk] sequence of each padded key
    # [sum b * Wk] position in its sequence (pads clamped to the last key)
    key_positions: torch.Tensor
    key_starts: torch.Tensor  # [B] offset of each sequence's keys in a packed key tensor
    out_rows: torch.Tensor  # [N] padded row holding each pack row's output


def plan_groups(seqlens_q: list[int], seqlens_k: list[int], device) -> PaddedPlan:
    """Group sequences by the next powers of two of (Lq, Lk). The index arithmetic runs on the host
    in NumPy (the lengths are host lists): the device only receives the finished index tensors."""
    len_q, len_k = np.asarray(seqlens_q, dtype=np.int64), np.asarray(seqlens_k, dtype=np.int64)
    if len_q.size == 0 or len_q.shape != len_k.shape or len_q.min() < 1 or (len_k < len_q).any():
        raise ValueError(
            f"need 1 <= seqlens_q <= seqlens_k per sequence, got {seqlens_q} and {seqlens_k}")
    q_starts = np.cumsum(len_q) - len_q
    # ceil(log2(L)) is below 64, so the pair makes one integer key (np.unique sorts the keys).
    log_q, log_k = _ceil_log2(len_q), _ceil_log2(len_k)
    _, group_of_seq = np.unique(log_q * 64 + log_k, return_inverse=True)
    groups, q_rows, key_seq_ids, key_positions, real = [], [], [], [], []
    for g in range(int(group_of_seq.max()) + 1):
        seq_ids = np.flatnonzero(group_of_seq == g)  # [b]
        lq, lk = len_q[seq_ids, None], len_k[seq_ids, None]  # [b, 1]
        # Padded to the group's powers of two, not its longest sequence: a sequence's SDPA shape
        # (and so its rounding) then depends on its own lengths only, never on the batch it is in.
        rows_q, rows_k = (np.arange(1 << int(x[seq_ids[0]]))[None] for x in (log_q, log_k))
        q_rows.append((q_starts[seq_ids, None] + np.minimum(rows_q, lq - 1)).ravel())
        real.append((rows_q < lq).ravel())
        key_seq_ids.append(np.repeat(seq_ids, rows_k.shape[1]))
        key_positions.append(np.minimum(rows_k, lk - 1).ravel())
        offsets = (lk - lq)[:, 0]
        groups.append(_Group(len(seq_ids), rows_q.shape[1], rows_k.shape[1],
                             _long(offsets, device) if offsets.any() else None))
    q_rows, real = np.concatenate(q_rows), np.concatenate(real)
    padded_of_real = np.flatnonzero(real)  # padded rows that are real, in group order
    out_rows = np.empty(int(len_q.sum()), dtype=np.int64)
    out_rows[q_rows[padded_of_real]] = padded_of_real
    return PaddedPlan(groups, _long(q_rows, device), _long(np.concatenate(key_seq_ids), device),
                      _long(np.concatenate(key_positions), device),
                      _long(np.cumsum(len_k) - len_k, device), _long(out_rows, device))


def packed_causal_attention(q, k, v, plan: PaddedPlan, scale: float):
    """Causal attention within each sequence of packed batches; differentiable.

    q [sum Lq, H, D] (the last Lq tokens of each sequence), k/v [sum Lk, Hkv, D] (all Lk tokens of
    each sequence), sequences end to end in the plan's order -> [sum Lq, H, D]. A training pack has
    Lq = Lk.
    """
    key_rows = plan.key_starts[plan.key_seq_ids] + plan.key_positions
    return _grouped_attention(q, k, v, key_rows, plan, scale)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, plan: PaddedPlan, scale: float):
    """New tokens attend to their whole sequence read from the pages: the cached prefix and the new
    tokens, which must already be stored.

    q [N, H, D] (new tokens, packed), caches [num_blocks, block_size, Hkv, D], block_tables
    [B, max_blocks] int -> [N, H, D].
    """
    block_size = k_cache.shape[1]
    slots = key_slots(block_tables, plan.key_seq_ids, plan.key_positions, block_size)
    return _grouped_attention(q, k_cache.flatten(0, 1), v_cache.flatten(0, 1), slots, plan, scale)


def _grouped_attention(q, keys, values, key_rows, plan: PaddedPlan, scale: float):
    """q [N, H, D]; keys/values [M, Hkv, D] read at key_rows [sum b * Wk] -> [N, H, D].

    index_select rather than indexing: its backward is an index_add, faster on the CPU than the
    accumulating index_put of `x[rows]` (70 vs 103 ms for 20k rows of 8 x 64 floats, 2 cores).
    """
    padded_q = q.index_select(0, plan.q_rows)
    padded_k, padded_v = keys.index_select(0, key_rows), values.index_select(0, key_rows)
    outs, start_q, start_k = [], 0, 0
    for group in plan.groups:
        b, wq, wk = group.num_seqs, group.width_q, group.width_k
        mask = None
        if group.query_offsets is not None:  # bottom-right causal: row r sees keys <= offset + r
            last_key = group.query_offsets[:, None] + torch.arange(wq, device=q.device)  # [b, Wq]
            # [b, 1, Wq, Wk]
            mask = (torch.arange(wk, device=q.device) <= last_key[:, :, None])[:, None]
        # [b, H, Wq, D]
        group_q = padded_q[start_q:start_q + b * wq].unflatten(0, (b, wq)).transpose(1, 2)
        group_k, group_v = (x[start_k:start_k + b * wk].unflatten(0, (b, wk)).transpose(1, 2)
                            for x in (padded_k, padded_v))  # [b, Hkv, Wk, D]
        out = F.scaled_dot_product_attention(group_q, group_k, group_v, attn_mask=mask,
                                             is_causal=mask is None, scale=scale, enable_gqa=True)
        outs.append(out.transpose(1, 2).flatten(0, 1))  # [b * Wq, H, D]
        start_q, start_k = start_q + b * wq, start_k + b * wk
    return torch.cat(outs).index_select(0, plan.out_rows)


def _ceil_log2(lengths: np.ndarray) -> np.ndarray:
    """ceil(log2(L)) of positive int64 lengths (exact: float64 holds powers of two exactly)."""
    return np.ceil(np.log2(lengths.astype(np.float64))).astype(np.int64)


def _long(values: np.ndarray, device) -> torch.Tensor:
    """A host index array as an int64 tensor on `device` (one copy)."""
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(device)
