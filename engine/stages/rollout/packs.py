"""A rollout's pack: its R prompt + response rows packed once for every training forward, the
response tokens as targets on an [R, T] grid (T the longest response), and packs of several
sampling rounds joined on the widest grid."""
from __future__ import annotations

import itertools

import torch

from ...data.device_tensors import packed_cu_seqlens
from ...data.packing import PackedBatch, pack_sequences


def pack_rollout(prompts: list[list[int]], responses: list[list[int]], device,
                 width: int | None = None, share_prompts: bool = False,
                 model_masks: list[list[bool]] | None = None,
                 images: list | None = None) -> PackedBatch:
    """Pack prompt + response pairs, the response tokens as targets on an [R, width] grid
    (default width: the longest response). share_prompts (train.prefix_sharing): rows with the
    same prompt forward it once (engine/data/prefix_sharing.py). model_masks (one bool per
    response token: a multi-turn trajectory's sampled tokens): only those are targets, the
    environment's tokens are context. images: each row's ImageInputs (its prompt's, None for
    text), placed in the pack for every forward; rows share a prompt with its images (a group's
    rows hold the same ImageInputs: its prompt row's)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"pack_rollout: need as many responses as prompts (> 0), got "
                         f"{len(prompts)} prompts and {len(responses)} responses")
    width = width or max(len(r) for r in responses)
    for r, (prompt, response) in enumerate(zip(prompts, responses)):
        if not prompt or not response or len(response) > width:
            raise ValueError(f"pack_rollout: row {r} has {len(prompt)} prompt and {len(response)} "
                             f"response tokens; both must be >= 1 and the response <= width "
                             f"{width}")
    targets = model_masks or [True] * len(prompts)
    return pack_sequences([(p, r, tuple(t) if isinstance(t, list) else t)
                           for p, r, t in zip(prompts, responses, targets)], width=width,
                          device=device, images=images,
                          share_prompts=share_prompts)


def concat_packs(parts: list[PackedBatch]) -> PackedBatch:
    """Rollout packs one after the other (e.g. dynamic sampling's rounds), on the widest grid.
    Offsets are added on the device; the lengths are host lists (no sync)."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.width for p in parts)
    token_offset = row_offset = 0
    rows, grids = [], []
    for p in parts:
        rows.append(p.target_rows + token_offset)
        # A target at (row, column) of its part's grid moves to (row + row_offset, column) of the
        # wider one.
        grids.append(torch.div(p.grid_index, p.width, rounding_mode="floor") * width
                     + p.grid_index % p.width + row_offset * width)
        token_offset, row_offset = token_offset + sum(p.seqlens), row_offset + len(p.seqlens)
    seqlens = [n for p in parts for n in p.seqlens]
    # Each part's groups are its own (another round's prompts): ids offset past the earlier parts'.
    offsets = itertools.accumulate((max(p.prefix_groups, default=-1) + 1 for p in parts[:-1]),
                                   initial=0)
    prefix_groups = [g + offset for p, offset in zip(parts, offsets) for g in p.prefix_groups]
    return PackedBatch(torch.cat([p.input_ids for p in parts]), seqlens, torch.cat(rows),
                       torch.cat([p.target_ids for p in parts]),
                       [n for p in parts for n in p.target_counts], [], torch.cat(grids), width,
                       torch.cat([p.positions for p in parts]),
                       packed_cu_seqlens(seqlens, parts[0].input_ids.device),
                       None if parts[0].routing is None else torch.cat([p.routing for p in parts]),
                       prefix_groups, [n for p in parts for n in p.prompt_lens],
                       *_joined_images(parts))


def _joined_images(parts: list[PackedBatch]) -> tuple:
    """The parts' (pixel_values, image_grid_thw, image_counts) one after the other."""
    if all(p.pixel_values is None for p in parts):
        return None, None, []
    with_images = [p for p in parts if p.pixel_values is not None]
    return (torch.cat([p.pixel_values for p in with_images]),
            torch.cat([p.image_grid_thw for p in with_images]),
            [n for p in parts for n in (p.image_counts or [0] * len(p.seqlens))])


def pad_width(grid: torch.Tensor, width: int) -> torch.Tensor:
    """[R, T] -> [R, width] (width >= T), zeros on the right."""
    return torch.nn.functional.pad(grid, (0, width - grid.shape[1]))
