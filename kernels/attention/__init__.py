"""Attention, every path and the choice between them, public as `fusedrl.kernels.attention`: the
model's attention module (engine/model/attention.py) calls the paths; the runner, context
parallelism and the exact mode build their metadata and page addressing from here (the exact
mode's own attention is the invariant package's, kernels/invariant/attention.py).

- backend.py: the decider, `attention_backend(q, page_size)`, `flash_attn()`, and
  `packed_attention_kernel` (what a packed batch runs on a device, as a record names it);
- paths.py: `varlen_attention` (a packed training batch, or a prefill with nothing cached),
  `prefill_attention` (new tokens over cached pages), `flash_decode_attention` (flash-attn's paged
  decode), over an `AttentionMetadata` (metadata.py), on the kernel the decider names: flash-attn,
  torch's varlen kernel (varlen.py) or padded SDPA groups (padded.py);
- paged.py: the paged KV cache's `store_kv` and the fused decode step `rope_store_decode` (Triton,
  or the reference on the "torch" backend);
- pages.py: where a token's K/V live in the paged cache (`page_slot`, `sequence_slot`,
  `key_slots`), the formula the engine's slot mapping and these readers share.
"""
from .backend import FLASH_PAGE_MULTIPLE, attention_backend, flash_attn, packed_attention_kernel
from .metadata import AttentionMetadata
from .paged import launch_splits, rope_store_decode, store_kv
from .pages import key_slots, page_slot, sequence_slot
from .paths import flash_decode_attention, prefill_attention, varlen_attention

__all__ = ["FLASH_PAGE_MULTIPLE", "attention_backend", "flash_attn", "packed_attention_kernel",
           "AttentionMetadata", "varlen_attention", "prefill_attention", "flash_decode_attention",
           "store_kv", "rope_store_decode", "launch_splits", "page_slot", "sequence_slot",
           "key_slots"]
