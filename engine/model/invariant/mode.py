"""`BatchInvariant`: the batch-invariant mode as an object handed to whoever computes a token's
log-prob, the engine's runner (`LLM(..., batch_invariant=True)`) and the trainer's old-log-prob
forward (`rollout.exact=true`). No global flag: the two sides share the object, and with it the
parameters both must agree on: the KV page size and the attention segment.

What it guarantees: the sampler's log-prob of a sampled token equals, bit for bit, the log-prob that
`head_logprobs(packed_hidden(...))` gives for the same token of the same sequence, whatever else is
in either batch (batch size and order, pack layout, prefix sharing between the n samples of a
prompt, preemption and recompute). Both sides run the same primitive set (`primitives.EXACT`, the
ops of `fusedrl.kernels.exact`: fixed-order torch ops on the CPU, fixed-tile Triton kernels on GPUs)
through the model's one decoder walk (`CausalLM.forward` given an `attend` and `prims`, the walk the
default forward runs too) on the same weights, and read keys through the same kind of page table.
Top-k/top-p filter the draw only: the
log-prob reported is under softmax(logits / temperature), the distribution the trainer's
`old_logprobs` are taken under.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...data.device_tensors import device_tensor
from .... import kernels
from ....kernels.attention import AttentionMetadata, page_slot
from ..primitives import EXACT

# Logits held at once by `head_logprobs`, in fp32 elements (256 MiB): more rows run in pieces.
LOGIT_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class BatchInvariant:
    """chunk_size: the KV block size of the engine the tokens come from (the page of the key
    tables). segment: keys per attention segment of the GPU kernel (a power of two >= 16); the CPU
    path reduces page by page and does not use it."""

    chunk_size: int
    segment: int = 256

    def __post_init__(self):
        if (not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool)
            or self.chunk_size < 1):
            raise ValueError(
                f"BatchInvariant.chunk_size={self.chunk_size!r} is invalid: expected an int >= 1 "
                "(the KV block size)")
        if (not isinstance(self.segment, int) or self.segment < 16
            or self.segment & (self.segment - 1)):
            raise ValueError(
                f"BatchInvariant.segment={self.segment!r} is invalid: "
                "expected a power of two >= 16")

    def packed_hidden(self, model, input_ids: torch.Tensor, seqlens: list[int], *,
                      pixel_values=None, image_grid_thw=None,
                      image_counts: list[int] = ()) -> torch.Tensor:
        """The training forward: input_ids [N] holding sequences of `seqlens` back to back
        (positions restart at 0 in each), on the model's device -> final hidden states [N, hidden]
        of `model` (a CausalLM). A vision-language model's pack: its images (pixel_values,
        image_grid_thw of every image in token order) placed and rotated by M-RoPE, the attention
        still by token index."""
        if sum(seqlens) != input_ids.shape[0] or min(seqlens, default=0) < 1:
            raise ValueError(f"seqlens={seqlens} must be positive and sum to {input_ids.shape[0]}")
        model.check_input_ids(input_ids)
        lens = device_tensor(seqlens, torch.int64, input_ids.device)
        starts = lens.cumsum(0) - lens
        seq_index = _sequence_of_each_token(lens)
        positions = torch.arange(input_ids.shape[0], device=input_ids.device) - starts[seq_index]
        fresh = self._fresh_attention(positions, seq_index, starts, max(seqlens))

        def attend(layer, q, k, v, angles):
            return fresh(*angles.rotate(q, k), v)
        if model.config.vision is None:
            return model.entry()(input_ids, positions, attend=attend, prims=EXACT)
        rotary = model.mrope_positions(input_ids, seqlens, image_grid_thw)[0]
        features = (None if pixel_values is None
                    else _encoded_by_sequence(model, pixel_values, image_grid_thw, image_counts))
        return model.entry()(input_ids, rotary, attend=attend, prims=EXACT,
                             visual=model.visual_rows(input_ids, features))

    def paged_hidden(self, model, input_ids: torch.Tensor, positions: torch.Tensor,
                     meta: AttentionMetadata, kv_caches: list, visual=None) -> torch.Tensor:
        """A prefill or decode step against the paged cache: input_ids, positions [N], the runner's
        metadata, per-layer (k_cache, v_cache) whose block size is chunk_size -> hidden [N, hidden].
        New K/V are stored before attending. No host sync (a decode step can be a CUDA graph).
        A vision-language model's positions are its rotary ones (M-RoPE's [3, N] in a prefill,
        token index + decode offset in a decode step) and visual its image rows; its attention
        takes the token indices from the metadata."""
        block_size = kv_caches[0][0].shape[1]
        if block_size != self.chunk_size:
            raise ValueError(
                f"KV block size {block_size} != BatchInvariant.chunk_size {self.chunk_size}: "
                "pages and the key tables must align")
        if meta.is_decode:
            seq_index = torch.arange(input_ids.shape[0], device=input_ids.device)
        else:
            seq_index = _sequence_of_each_token(
                device_tensor(meta.seqlens_q, torch.int64, input_ids.device))
        rotary = positions
        if model.config.vision is not None:
            positions = _token_positions(meta, seq_index)
        walk = {"attend": None, "prims": EXACT, "visual": visual}
        # a prefill with nothing cached: the new tokens are whole sequences
        if meta.block_tables is None:
            fresh = self._fresh_attention(positions, seq_index, meta.cu_seqlens_q[:-1].long(),
                                       max(meta.seqlens_q))

            def attend(layer, q, k, v, angles):
                q, k = angles.rotate(q, k)
                kernels.store_kv(k, v, *kv_caches[layer], meta.slot_mapping)
                return fresh(q, k, v)
            return model.entry()(input_ids, rotary, **{**walk, "attend": attend})
        # -1 -> row 0
        page_table = page_slot(meta.block_tables.clamp(min=0), 0, self.chunk_size).to(torch.int32)
        # the table's reach: a host int
        max_position = meta.block_tables.shape[1] * self.chunk_size - 1

        def attend(layer, q, k, v, angles):
            q, k = angles.rotate(q, k)
            k_cache, v_cache = kv_caches[layer]
            kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            return EXACT.attention(q, k_cache.flatten(0, 1), v_cache.flatten(0, 1), positions,
                                   seq_index, page_table, self.chunk_size, self.segment,
                                   max_position)
        return model.entry()(input_ids, rotary, **{**walk, "attend": attend})

    def _fresh_attention(self, positions, seq_index, starts, max_len: int):
        """Attention over the K/V of this forward's own tokens (a pack, or a prefill with nothing
        cached), (q, k, v) rotated -> [N, H, D]: starts [S] int64 index of each sequence's first
        token."""
        width = -(-max_len // self.chunk_size)
        offsets = torch.arange(width, device=starts.device) * self.chunk_size
        # [S, W] a page = chunk_size tokens
        page_table = (starts[:, None] + offsets).to(torch.int32)

        def attend(q, k, v):
            return EXACT.attention(q, k.contiguous(), v.contiguous(), positions, seq_index,
                                   page_table, self.chunk_size, self.segment, max_len - 1)
        return attend

    @staticmethod
    def logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """hidden [M, H] @ LM head weight [V, H].T -> fp32 logits [M, V] (not rounded to the
        weight's dtype)."""
        return EXACT.linear(hidden, weight, out_dtype=torch.float32)

    @staticmethod
    def sampler_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                         temperatures: torch.Tensor) -> torch.Tensor:
        """The sampler's log-probs: logits [B, V] fp32, tokens [B], temperatures [B] fp32 (0 =
        greedy, reported at temperature 1 as the default sampler does) -> fp32 [B]."""
        return EXACT.row_logprobs(logits, tokens,
                                  torch.where(temperatures > 0, temperatures, 1.0))[0]

    def head_logprobs(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                      temperature: float, with_entropy: bool = False, masked=()):
        """The trainer's log-probs: hidden [M, H] (rows predicting labels [M]), LM head weight [V,
        H] -> fp32 log-probs [M] under softmax(logits / temperature) (and the entropy [M]
        with_entropy). The logits exist for a piece of the rows at a time. masked: token ids whose
        logits are -inf, as the sampler's (a vision-language model's vision_token_ids)."""
        temperatures = torch.full(labels.shape, temperature, dtype=torch.float32,
                                  device=hidden.device)
        step = max(32, LOGIT_ELEMENTS // weight.shape[0] // 32 * 32)  # whole 32-row tiles per piece
        pieces = [EXACT.row_logprobs(mask_logits(self.logits(hidden[i:i + step], weight), masked),
                                     labels[i:i + step], temperatures[i:i + step])
                  for i in range(0, hidden.shape[0], step)]
        logp = (torch.cat([p[0] for p in pieces]) if pieces
                else hidden.new_zeros(0, dtype=torch.float32))
        if not with_entropy:
            return logp
        return logp, torch.cat([p[1] for p in pieces]) if pieces else logp.clone()


def mask_logits(logits: torch.Tensor, masked) -> torch.Tensor:
    """logits [M, V] with columns `masked` (token ids: a tensor or a sequence) set to -inf."""
    if len(masked) == 0:
        return logits
    ids = torch.as_tensor(masked, dtype=torch.int64).to(logits.device)
    return logits.index_fill(1, ids, float("-inf"))


def _token_positions(meta: AttentionMetadata, seq_index: torch.Tensor) -> torch.Tensor:
    """Each forwarded token's index in its sequence [N] int64: a decode step's last token (context
    length - 1), a prefill's rows after their cached prefix."""
    if meta.is_decode:
        return (meta.context_lens.long() - 1).clamp(min=0)
    device = seq_index.device
    cached = device_tensor([k - q for q, k in zip(meta.seqlens_q, meta.seqlens_k)], torch.int64,
                           device)
    first = meta.cu_seqlens_q[:-1].long()
    return torch.arange(seq_index.shape[0], device=device) - first[seq_index] + cached[seq_index]


def _sequence_of_each_token(lens: torch.Tensor) -> torch.Tensor:
    """lens [S] int64 sequence lengths -> [sum(lens)] int64: each token's sequence, back to back."""
    return torch.repeat_interleave(torch.arange(lens.shape[0], device=lens.device), lens)


def _encoded_by_sequence(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                         image_counts) -> object:
    """The tower's features of a pack's images, each sequence's images encoded on their own
    (image_counts [S]: images per sequence; empty: all at once), as the engine encodes each
    prompt's: the tower's matmuls round by how many patches they see together, so only the same
    grouping gives the same bits."""
    if not image_counts:
        return model.encode_images(pixel_values, image_grid_thw)
    grids = torch.as_tensor(image_grid_thw)
    patches = grids.prod(dim=1).tolist()
    parts, image, row = [], 0, 0
    for count in image_counts:
        if count:
            rows = sum(patches[image:image + count])
            parts.append(model.encode_images(pixel_values[row:row + rows],
                                             grids[image:image + count]))
            image, row = image + count, row + rows
    return type(parts[0])(torch.cat([p.embeds for p in parts]),
                          tuple(torch.cat(d) for d in zip(*(p.deepstack for p in parts))))
