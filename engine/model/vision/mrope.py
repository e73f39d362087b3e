"""M-RoPE positions: get_rope_index of transformers' Qwen2.5-VL and Qwen3-VL for packed sequences.

A text token has one position on all three axes (time, height, width), one past the previous
token's largest. An image of grid (t, h, w) patches, merged m x m, is t * h * w / m**2 placeholder
tokens (`image_token_id`) in a row: token (i, j, k) of it sits at (start + i, start + j, start + k),
and the text after it starts at start + max(h, w) / m. Every placeholder run is checked against its
image's grid here, so features can never land on the wrong tokens: a mismatch is a one-line error.
"""
from __future__ import annotations

import torch

from ...data.device_tensors import device_tensor
from .spec import VisionSpec


def _image_positions(start: int, grid, merge: int) -> list[list[int]]:
    """[3][t * h/m * w/m] positions of one image's tokens, starting at `start`."""
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    cells = [(i, j, k) for i in range(t) for j in range(h) for k in range(w)]
    return [[start + cell[axis] for cell in cells] for axis in range(3)]


def sequence_positions(ids: list[int], grids: list, spec: VisionSpec, where: str = "input_ids"
                       ) -> tuple[list[list[int]], int]:
    """One sequence's token ids [L] and its images' grids [I][3], in order -> (positions [3][L],
    delta): the position of token p past the sequence's end is p + delta on every axis (the decode
    offset). ValueError when a placeholder run does not match its image's grid, or the runs and
    the grids differ in number; `where` names the sequence in the message."""
    if spec.video_token_id in ids:
        raise ValueError(f"{where}: holds video tokens (id {spec.video_token_id}); videos are not "
                         "supported, images are")
    axes: list[list[int]] = [[], [], []]
    current, p, image = 0, 0, 0
    while p < len(ids):
        if ids[p] != spec.image_token_id:
            for axis in axes:
                axis.append(current)
            current, p = current + 1, p + 1
            continue
        run = p
        while run < len(ids) and ids[run] == spec.image_token_id:
            run += 1
        if image >= len(grids):
            raise ValueError(f"{where}: an image placeholder run at token {p} but only "
                             f"{len(grids)} image(s) in image_grid_thw")
        need = spec.tokens_per_image(grids[image])
        if run - p != need:
            raise ValueError(
                f"{where}: image {image}'s placeholder run at token {p} is {run - p} tokens, its "
                f"grid {tuple(int(v) for v in grids[image])} needs {need} (t*h*w / "
                f"{spec.spatial_merge_size}**2)")
        for axis, values in zip(axes, _image_positions(current, grids[image],
                                                       spec.spatial_merge_size)):
            axis.extend(values)
        current += max(int(grids[image][1]), int(grids[image][2])) // spec.spatial_merge_size
        p, image = run, image + 1
    if image != len(grids):
        raise ValueError(f"{where}: {image} image placeholder run(s) but {len(grids)} image(s) "
                         "in image_grid_thw")
    return axes, (max(max(a) for a in axes) + 1 - len(ids)) if ids else 0


def packed_positions(input_ids: torch.Tensor, seqlens: list[int], image_grid_thw, spec: VisionSpec
                     ) -> tuple[torch.Tensor, list[int]]:
    """input_ids [N] of packed sequences (positions restart in each), image_grid_thw [I, 3] of
    every image of the pack in token order (or None) -> (positions [3, N] int64 on input_ids'
    device, each sequence's decode offset [S]). One host copy of the ids."""
    ids = input_ids.tolist()
    grids = [] if image_grid_thw is None else [tuple(g) for g in torch.as_tensor(
        image_grid_thw).tolist()]
    axes: list[list[int]] = [[], [], []]
    deltas, start, used = [], 0, 0
    for s, n in enumerate(seqlens):
        seq = ids[start:start + n]
        runs = sum(1 for p, t in enumerate(seq) if t == spec.image_token_id
                   and (p == 0 or seq[p - 1] != spec.image_token_id))
        where = f"input_ids sequence {s}" if len(seqlens) > 1 else "input_ids"
        pos, delta = sequence_positions(seq, grids[used:used + runs], spec, where)
        for axis, values in zip(axes, pos):
            axis.extend(values)
        deltas.append(delta)
        start, used = start + n, used + runs
    if used != len(grids):
        raise ValueError(f"image_grid_thw: {len(grids)} images for {used} placeholder run(s) in "
                         "input_ids")
    return device_tensor(axes, torch.int64, input_ids.device), deltas
