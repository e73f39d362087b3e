"""Packing tokenized examples into micro-batches of at most `tokens_per_batch` tokens.

A micro-batch is one flat token row with per-sequence lengths, the input of
`CausalLM.forward_packed`: no padding, no attention across sequences. The order of an epoch is a
seeded permutation, so (epoch, micro-batch index) is a complete data position for resuming.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Optional

import torch

from ..errors import ConfigValueError
from .device_tensors import device_tensor, packed_cu_seqlens
from .prefix_sharing import forwarded_tokens, prompt_groups
from .tokenization import TokenizedExample


class PackedBatch(NamedTuple):
    """Sequences packed back to back for one `CausalLM.forward_packed`, with their training targets.

    The one batch type of every stage. A target is a packed position whose hidden state predicts
    the next token (SFT: the response tokens; RM: the best response's tokens, for the beta_rm LM
    term; PPO: the sampled response tokens). Targets are stored sequence by sequence.
    """
    input_ids: torch.Tensor      # [N] int64, sequences back to back
    seqlens: list[int]           # [S] tokens per sequence, sum == N
    target_rows: torch.Tensor    # [M] int64 packed positions predicting a target
    target_ids: torch.Tensor     # [M] int64 the tokens they predict
    target_counts: list[int]     # [S] targets of each sequence, sum == M
    group_sizes: list[int] = []  # RM: K consecutive sequences per example, best first
    # PPO: [M] flat index of each target in the [S, width] grid
    grid_index: Optional[torch.Tensor] = None
    width: int = 0               # PPO: T of that grid, the longest response
    positions: Optional[torch.Tensor] = None   # [N] int64 position of each token in its sequence
    # [S + 1] int32 sequence boundaries (attention metadata)
    cu_seqlens: Optional[torch.Tensor] = None
    # PPO on MoE: [N, sparse layers, k] int16 sampler's experts, -1 none
    routing: Optional[torch.Tensor] = None
    # Prefix sharing (prefix_sharing.py): [S] group of each sequence and [S] its prompt's
    # tokens; the sequences of one group share their first prompt_lens tokens, read once by a
    # forward. [] = off.
    prefix_groups: list[int] = []
    prompt_lens: list[int] = []
    # A vision model's images (vision_processor.ImageInputs of each sequence, joined in sequence
    # order): [P, patch values] pixels, [I, 3] grids and [S] images per sequence; None / [] = text.
    pixel_values: Optional[torch.Tensor] = None
    image_grid_thw: Optional[torch.Tensor] = None
    image_counts: list[int] = []

    @property
    def num_targets(self) -> int:
        return sum(self.target_counts)

    def image_inputs(self) -> dict:
        """{pixel_values, image_grid_thw} of the pack's images, as a vision-language model's
        forward_packed takes them; {} for a pack without images (any model's forward)."""
        if self.pixel_values is None:
            return {}
        return {"pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw}

    def to_grid(self, values: torch.Tensor) -> torch.Tensor:
        """Per-target values [M] -> [S, width], zeros off the targets (PPO's per-token layout)."""
        grid = values.new_zeros(len(self.seqlens) * self.width)
        return grid.index_copy(0, self.grid_index, values).view(len(self.seqlens), self.width)

    def grid_mask(self) -> torch.Tensor:
        """[S, width] bool, True where a target is."""
        return self.to_grid(torch.ones(self.num_targets, device=self.target_ids.device)) > 0

    def select(self, seqs: list[int]) -> "PackedBatch":
        """The sub-batch of sequences `seqs` (in that order), cut from this batch's tensors by one
        index tensor per stream: packing is done once (e.g. per rollout), not again for every
        minibatch of every epoch. The indices are built from the host's lengths (no device read)."""
        token_starts, target_starts = _starts(self.seqlens), _starts(self.target_counts)
        tokens, targets, row_shift, grid_shift = [], [], [], []
        position = 0
        for new, s in enumerate(seqs):
            count = self.target_counts[s]
            tokens += range(token_starts[s], token_starts[s] + self.seqlens[s])
            targets += range(target_starts[s], target_starts[s] + count)
            row_shift += [position - token_starts[s]] * count    # the target's sequence moved here
            grid_shift += [(new - s) * self.width] * count        # and its grid row too
            position += self.seqlens[s]
        device = self.input_ids.device
        token_index, target_index = _long(tokens, device), _long(targets, device)
        seqlens = [self.seqlens[s] for s in seqs]
        return PackedBatch(
            self.input_ids.index_select(0, token_index), seqlens,
            self.target_rows.index_select(0, target_index) + _long(row_shift, device),
            self.target_ids.index_select(0, target_index), [self.target_counts[s] for s in seqs],
            [], None if self.grid_index is None else
            self.grid_index.index_select(0, target_index) + _long(grid_shift, device), self.width,
            None if self.positions is None else self.positions.index_select(0, token_index),
            None if self.cu_seqlens is None else packed_cu_seqlens(seqlens, device),
            None if self.routing is None else self.routing.index_select(0, token_index),
            [self.prefix_groups[s] for s in seqs] if self.prefix_groups else [],
            [self.prompt_lens[s] for s in seqs] if self.prompt_lens else [],
            *self.images_of(seqs))

    def images_of(self, seqs: list[int]) -> tuple:
        """(pixel_values, image_grid_thw, image_counts) of the sequences `seqs`, in that order; the
        first two None when they hold no image (a pack's text-only slice is a text pack, as one
        that never held an image)."""
        if self.pixel_values is None:
            return None, None, []
        image_starts = _starts(self.image_counts)
        patches = self.image_grid_thw.prod(dim=1).tolist()
        patch_starts = _starts(patches)
        images = [i for s in seqs for i in range(image_starts[s],
                                                  image_starts[s] + self.image_counts[s])]
        if not images:
            return None, None, [0] * len(seqs)
        rows = [r for i in images for r in range(patch_starts[i], patch_starts[i] + patches[i])]
        device = self.pixel_values.device
        return (self.pixel_values.index_select(0, _long(rows, device)),
                self.image_grid_thw.index_select(0, _long(images, self.image_grid_thw.device)),
                [self.image_counts[s] for s in seqs])

    @property
    def forwarded_tokens(self) -> int:
        """Tokens one forward over this pack reads: each shared prompt once."""
        return forwarded_tokens(self.seqlens, self.prompt_lens, self.prefix_groups)


def _long(values: list[int], device) -> torch.Tensor:
    return device_tensor(values, torch.int64, device)


def _starts(sizes: list[int]) -> list[int]:
    return list(itertools.accumulate(sizes, initial=0))[:-1]


def pack_sequences(sequences: list[tuple[list[int], list[int], bool | tuple]], *,
                   group_sizes: list[int] = (), width: int = 0, device=None,
                   share_prompts: bool = False, images: list | None = None) -> PackedBatch:
    """Pack (prompt, response, is_target) triples: each becomes prompt + response, and when
    is_target its response tokens are targets (is_target may also be one bool per response token:
    the trained turns of a conversation, a trajectory's model tokens). width > 0 adds the
    [S, width] grid of PPO, a target at its response column. The positions and sequence
    boundaries are built here once, for every forward over the pack. share_prompts: sequences
    with the same prompt (and the same images) are marked to forward it once (prefix_sharing.py).
    images: each sequence's ImageInputs (its prompt holds their tokens) or None, joined in
    sequence order."""
    ids, seqlens, rows, targets, counts, grid, positions = [], [], [], [], [], [], []
    for s, (prompt, response, is_target) in enumerate(sequences):
        sequence = prompt + response
        # Position i predicts token i + 1; with an empty prompt the first response token has no
        # context.
        first = max(len(prompt), 1)
        if isinstance(is_target, bool):
            picked = range(first, len(sequence)) if is_target else range(0)
            columns = range(len(picked))
        else:  # a token's grid column is its place in the response (a trajectory's model turns)
            picked = [t for t, target in enumerate(is_target, len(prompt)) if target and t >= first]
            columns = [t - len(prompt) for t in picked]
        rows += (len(ids) + t - 1 for t in picked)
        targets += (sequence[t] for t in picked)
        grid += (s * width + c for c in columns) if width else []
        counts.append(len(picked))
        ids += sequence
        positions += range(len(sequence))
        seqlens.append(len(sequence))
    return PackedBatch(_long(ids, device), seqlens, _long(rows, device), _long(targets, device),
                       counts, list(group_sizes), _long(grid, device) if width else None, width,
                       _long(positions, device), packed_cu_seqlens(seqlens, device), None,
                       prompt_groups([p for p, _, _ in sequences], images) if share_prompts
                       else [],
                       [len(p) for p, _, _ in sequences] if share_prompts else [],
                       *join_images(images, device))


def join_images(images: list | None, device) -> tuple:
    """Each sequence's ImageInputs (or None) -> (pixel_values [P, D], image_grid_thw [I, 3],
    images per sequence [S]) of them all in order; (None, None, []) when none has an image."""
    present = [i for i in images or () if i is not None]
    if not present:
        return None, None, []
    return (torch.cat([i.pixel_values for i in present]).to(device),
            torch.cat([i.image_grid_thw for i in present]).to(device),
            [0 if i is None else i.num_images for i in images])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def pack(sizes: list[int], budget: int, budget_name: str = "tokens_per_batch",
         shared: tuple[list[int], list[int]] = ([], [])) -> list[list[int]]:
    """Greedy in order: indices into `sizes` grouped so that each group's total is <= budget
    (data.`budget_name`, named in the error when one size exceeds it). shared: (prefix group,
    prompt tokens) of each size (a PackedBatch's prefix_groups, prompt_lens): a prompt already in
    the group counts once."""
    prefix_groups, prompt_lens = shared
    groups, total, seen = [], budget + 1, set()
    for i, size in enumerate(sizes):
        if size > budget:
            raise ConfigValueError(
                f"an example of {size} tokens does not fit in {budget_name}={budget}; "
                f"raise data.{budget_name} or lower data.max_length")
        cost = size - prompt_lens[i] if prefix_groups and prefix_groups[i] in seen else size
        if total + cost > budget:
            groups.append([])
            total, seen, cost = 0, set(), size
        groups[-1].append(i)
        total += cost
        if prefix_groups:
            seen.add(prefix_groups[i])
    return groups


def epoch_batches(examples: list[TokenizedExample], budget: int, seed: int, epoch: int,
                  budget_name: str = "tokens_per_batch") -> list[list[TokenizedExample]]:
    """Micro-batches (lists of examples) of one epoch, shuffled by (seed, epoch), then packed
    (budget: data.`budget_name`)."""
    order = epoch_order(len(examples), seed, epoch)
    groups = pack([examples[i].num_tokens for i in order], budget, budget_name)
    return [[examples[order[j]] for j in group] for group in groups]


def collate_sft(examples: list[TokenizedExample]) -> PackedBatch:
    """SFT micro-batch: every response token is a target (of a conversation, its trained turns')."""
    return pack_sequences([(ex.prompt, ex.responses[0], True if ex.masks is None else ex.masks[0])
                           for ex in examples], images=[ex.images for ex in examples])


def collate_rm(examples: list[TokenizedExample]) -> PackedBatch:
    """RM micro-batch: each example's K sequences, best first (each with the example's images);
    the best response's tokens are the targets of the beta_rm LM term."""
    sequences = [(ex.prompt, response, k == 0) for ex in examples
                 for k, response in enumerate(ex.responses)]
    return pack_sequences(sequences, group_sizes=[len(ex.responses) for ex in examples],
                          images=[ex.images for ex in examples for _ in ex.responses])
