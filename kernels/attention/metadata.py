"""`AttentionMetadata`: what the attention paths need to know about a batch, built by the engine's
model runner (or the trainer) once per forward and shared by every layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .padded import PaddedPlan


@dataclass
class AttentionMetadata:
    """What attention needs to know about the batch, built by the model runner (or the trainer).

    seqlens_q/seqlens_k are host lists (no device sync in loops); the tensors live on the model's
    device. For a packed training batch only `seqlens_q` and `cu_seqlens_q` are set.
    """

    is_decode: bool = False
    seqlens_q: list[int] | None = None  # new tokens per sequence
    seqlens_k: list[int] | None = None  # cached + new tokens per sequence
    cu_seqlens_q: torch.Tensor | None = None  # [B + 1] int32
    cu_seqlens_k: torch.Tensor | None = None  # [B + 1] int32
    slot_mapping: torch.Tensor | None = None  # [N] int64 cache slot of each new token, -1 = skip
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32, -1 padded
    context_lens: torch.Tensor | None = None  # [B] int32 (decode)
    # A decode step's attention splits per (sequence, KV head), chosen by the model runner from its
    # tables' capacity (paged.launch_splits) so eager steps and CUDA graphs split alike; None: from
    # the block tables' width.
    decode_splits: int | None = None
    # A packed batch whose segments read keys before their own (prefix sharing: an answer after its
    # group's prompt): [sum seqlens_k] row of each segment's keys.
    key_rows: torch.Tensor | None = None
    # Built on first use by the padded SDPA path and shared by every layer of the forward.
    padded_plan: PaddedPlan | None = field(default=None, repr=False)

    @classmethod
    def packed(cls, seqlens: list[int], device,
               cu_seqlens: torch.Tensor | None = None) -> "AttentionMetadata":
        """Metadata of a packed training batch of sequences with these lengths (cu_seqlens [S + 1]
        int32: their boundaries when already on the device, e.g. a PackedBatch's)."""
        cu = cu_seqlens
        if cu is None:
            cu = torch.tensor([0] + seqlens, device=device, dtype=torch.int32)
            cu = cu.cumsum(0, dtype=torch.int32)
        return cls(seqlens_q=list(seqlens), seqlens_k=list(seqlens), cu_seqlens_q=cu,
                   cu_seqlens_k=cu)

    @classmethod
    def shared(cls, layout) -> "AttentionMetadata":
        """Metadata of a prefix-shared forward (a prefix_sharing.SharedLayout): each segment's
        queries are the last of its keys, read at layout.key_rows."""
        return cls(seqlens_q=layout.seqlens_q, seqlens_k=layout.seqlens_k,
                   cu_seqlens_q=layout.cu_seqlens_q, cu_seqlens_k=layout.cu_seqlens_k,
                   key_rows=layout.key_rows)
