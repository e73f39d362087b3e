"""A model's weights written as Hugging Face safetensors files, one parameter at a time.

Collective under torchrun: every rank walks the same parameters in the same order; a sharded one
(DTensor) is all-gathered alone, rank 0 moves it to the CPU and appends the bytes of its Hugging
Face tensors to the file being written. Each file's header (names, dtypes, shapes, offsets) is
known before any data, from the parameters' global shapes, so it is written first and the data
streamed after it: no rank holds more than one whole parameter at a time, on its device or its CPU.
One process runs the same code (a plain parameter is its own whole), so the files are the same
bytes whatever the world size. The split into files follows `max_shard_bytes` as
`save_pretrained` does (a new file when the next tensor would pass it).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

from ..ranks import sharded, world
from ..runs.durable import non_finite_error
from .weight_map import Block, hf_blocks, hf_shape, local_box

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def check_finite_shards(model: nn.Module, what: str) -> None:
    """NonFiniteError (on every rank) naming the first parameter with a NaN or inf in any rank's
    shard; collective (one reduction), nothing gathered. One host sync per parameter, at save
    only."""
    named = list(model.named_parameters())
    flags = [bool(p.is_floating_point() and not torch.isfinite(local_box(p)[0]).all())
             for _, p in named]
    flags = world.all_reduce_tensor(torch.tensor(flags + [False], dtype=torch.int32), "max")
    bad = flags.nonzero()
    if bad.numel():
        raise non_finite_error(named[int(bad[0])][0], what)


def write_weights(model: nn.Module, directory, max_shard_bytes: int, skip=(),
                  rename=None) -> None:
    """Write `model`'s Hugging Face tensors (all but the names in `skip`) into `directory` (rank 0;
    None on the other ranks, which only take part in the gathers): model.safetensors, or numbered
    files and their index past max_shard_bytes. rename(name) -> the name written (None: as is).
    Collective."""
    blocks = {(rename(name) if rename else name): b for name, b in hf_blocks(model).items()
              if name not in skip}
    files = _split(blocks, max_shard_bytes)
    names = [SINGLE_FILE] if len(files) == 1 else [
        f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        for i in range(len(files))]
    gathered: dict = {}  # the one whole parameter held: its parts may be several tensors in a row
    for file, group in zip(names, files):
        out = None if directory is None else open(Path(directory) / file, "wb")
        try:
            if out is not None:
                out.write(_header({name: blocks[name] for name in group}))
            for name in group:
                tensor = _whole(blocks[name], gathered)
                if out is not None:
                    out.write(tensor.view(torch.uint8).numpy().data)
        finally:
            if out is not None:
                out.close()
    if directory is not None and len(files) > 1:
        weight_map = {name: file for file, group in zip(names, files) for name in group}
        total = sum(_nbytes(b) for b in blocks.values())
        (Path(directory) / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _whole(blocks: list[Block], gathered: dict) -> torch.Tensor:
    """The Hugging Face tensor of `blocks` on rank 0's CPU, contiguous (None elsewhere); its
    parameter is gathered once for all its parts, the previous one dropped."""
    param = blocks[0].param_name
    if param not in gathered:
        gathered.clear()
        whole = sharded.whole_value(blocks[0].param.detach())
        gathered[param] = whole.cpu() if world.is_main() else None
    whole = gathered[param]
    if whole is None:
        return None
    if len(blocks) == 1 and not blocks[0].lead and blocks[0].rows == whole.shape[0]:
        return whole.contiguous()
    out = whole.new_empty(hf_shape(blocks))
    for b in blocks:
        out[b.part_row:b.part_row + b.rows] = whole[b.lead][b.row:b.row + b.rows]
    return out


def _nbytes(blocks: list[Block]) -> int:
    return torch.Size(hf_shape(blocks)).numel() * blocks[0].param.element_size()


def _split(blocks: dict, max_bytes: int) -> list[list[str]]:
    """Tensor names per file, in order; a new file when the next tensor would pass max_bytes."""
    files, size = [[]], 0
    for name, b in blocks.items():
        nbytes = _nbytes(b)
        if files[-1] and size + nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    return files


def _header(blocks: dict) -> bytes:
    """The safetensors header of `blocks`' tensors laid out in order: 8 bytes of length, then JSON
    padded with spaces to a multiple of 8 (the data's alignment)."""
    entries, at = {"__metadata__": {"format": "pt"}}, 0
    for name, b in blocks.items():
        dtype = b[0].param.dtype
        if dtype not in _DTYPES:
            raise TypeError(
                f"tensor {name!r} is {dtype}: safetensors export supports "
                f"{sorted(map(str, _DTYPES))}")
        entries[name] = {"dtype": _DTYPES[dtype], "shape": list(hf_shape(b)),
                         "data_offsets": [at, at + _nbytes(b)]}
        at += _nbytes(b)
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text
