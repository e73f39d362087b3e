"""The tensors of a checkpoint, DCP-style: every rank writes the chunks it holds to its own
safetensors file, and one index (written by rank 0 into the checkpoint's JSON) gives each tensor's
dtype, global shape and chunks, so any number of ranks reads it back.

A chunk is a box of a tensor: `offsets` and `sizes` per dimension, in the file
`rank-RRRRR.safetensors` under the tensor's name. A sharded (DTensor) tensor contributes each rank's
local shard; a plain tensor is one whole chunk. A chunk several ranks hold alike (replicated LoRA
adapters, optimizer step counters, an HSDP replica) is written once, by the lowest of those ranks.
A rank's file also holds its own RNG states (tensors not in the index; python's in the file's
metadata). Reading takes any box of a tensor from the chunks that overlap it (`ShardReader.read`),
so a rank reads only the rows its own shard needs.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ...runs.durable import CorruptDirectory
from ...parallel import distributed
# (chunk, offsets): a DTensor's shard, a plain tensor whole
from ...model.weight_map import local_box as local_chunk

_FILE = re.compile(r"rank-\d{5}\.safetensors")
PYTHON_RNG = "python_rng"  # the metadata key of a rank file holding python's RNG state (JSON)
# The dtypes a checkpoint may hold, by the name the index records.
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise TypeError(
            f"a checkpoint cannot hold {dtype} tensors; expected one of {sorted(DTYPES)}")
    return name


def write_shards(directory: Path, tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                 python_rng: list) -> dict:
    """Write this rank's chunks of `tensors` (plus `own`: tensors of this rank alone, and python's
    RNG state) to directory/rank-R.safetensors; collective. Returns the index
    {name: {"dtype", "shape", "chunks": [{"file", "offsets", "sizes"}]}} of every rank's chunks."""
    held = {name: local_chunk(t) for name, t in tensors.items()}
    mine = {name: (dtype_name(local.dtype), list(tensors[name].shape), offsets, list(local.shape))
            for name, (local, offsets) in held.items()}
    index: dict = {}
    writes = set()
    for rank, chunks in enumerate(distributed.all_gather(mine)):
        for name, (dtype, shape, offsets, sizes) in chunks.items():
            entry = index.setdefault(name, {"dtype": dtype, "shape": shape, "chunks": []})
            if (entry["dtype"], entry["shape"]) != (dtype, shape):
                raise RuntimeError(
                    f"ranks disagree on tensor {name!r}: {entry['dtype']} {entry['shape']} "
                    f"and {dtype} {shape} on rank {rank}")
            empty = math.prod(sizes) == 0 and math.prod(shape) != 0
            if (empty
                or any(c["offsets"] == offsets and c["sizes"] == sizes for c in entry["chunks"])):
                continue
            entry["chunks"].append({"file": rank_file(rank), "offsets": offsets, "sizes": sizes})
            if rank == distributed.rank():
                writes.add(name)
    # Copies: safetensors refuses tensors sharing memory (tied weights), and device tensors come to
    # the host.
    payload = {name: held[name][0].detach().to("cpu", copy=True).contiguous()
               for name in sorted(writes)}
    payload.update({name: t.detach().to("cpu", copy=True).contiguous() for name, t in own.items()})
    save_file(payload, str(directory / rank_file(distributed.rank())),
              metadata={PYTHON_RNG: json.dumps(python_rng)})
    return index


def check_index(index: dict, where: Path) -> None:
    """CorruptDirectory unless every tensor's chunks lie in its shape, in files of ours, and add up
    to its size (that they do not overlap is checked where they are read: `ShardReader.read`)."""
    if not isinstance(index, dict):
        raise CorruptDirectory(f"{where}: the tensor index is not a mapping of names")
    name = None
    try:
        for name, entry in index.items():
            shape, chunks = entry["shape"], entry["chunks"]
            if entry["dtype"] not in DTYPES:
                raise ValueError(f"dtype {entry['dtype']!r}")
            boxes = []
            for c in chunks:
                offsets, sizes = c["offsets"], c["sizes"]
                if not _FILE.fullmatch(c["file"]) or len(offsets) != len(shape) or len(
                    sizes) != len(shape) or any(
                        type(x) is not int for x in [*offsets, *sizes, *shape]) or any(
                        o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape)):
                    raise ValueError(f"chunk {c}")
                boxes.append((offsets, sizes))
            if sum(math.prod(s) for _, s in boxes) != math.prod(shape):
                raise ValueError(f"chunks {chunks} do not tile shape {shape}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CorruptDirectory(
            f"{where}: tensor {name!r} has an unreadable index entry ({e})") from None


def _overlap(a, b) -> list | None:
    """The box where boxes a and b (offsets, sizes) meet, as [(start, stop)] per dim ([] for 0-dim
    tensors); None if they do not meet."""
    box = [(max(oa, ob), min(oa + sa, ob + sb)) for oa, sa, ob, sb in zip(*a, *b)]
    return box if all(lo < hi for lo, hi in box) else None


class ShardReader:
    """Reads boxes of the tensors of a checkpoint directory through its index (checked first)."""

    def __init__(self, directory: Path, index: dict):
        check_index(index, directory)
        self.directory, self.index = directory, index
        self._files: dict = {}

    def _open(self, file: str):
        if file not in self._files:
            try:
                self._files[file] = safe_open(str(self.directory / file), framework="pt",
                                              device="cpu")
            except (SafetensorError, OSError) as e:
                raise CorruptDirectory(
                    f"{self.directory / file}: not a readable safetensors file ({e})") from None
        return self._files[file]

    def read(self, name: str, offsets: list[int], sizes: list[int]) -> torch.Tensor:
        """The box (offsets, sizes) of tensor `name`, assembled from the chunks it overlaps."""
        entry = self.index[name]
        out = torch.empty(sizes, dtype=DTYPES[entry["dtype"]])
        found = [(chunk, box) for chunk in entry["chunks"]
                 if (
                     box := _overlap((offsets, sizes),
                                     (chunk["offsets"], chunk["sizes"]))) is not None]
        # The chunks in this box must fill it without overlapping (a few per box: no quadratic
        # cost).
        boxes = [([lo for lo, _ in box], [hi - lo for lo, hi in box]) for _, box in found]
        if sum(math.prod(s) for _, s in boxes) != math.prod(sizes) or any(
                _overlap(a, b) is not None for i, a in enumerate(boxes) for b in boxes[i + 1:]):
            raise CorruptDirectory(
                f"{self.directory}: the chunks of tensor {name!r} do not tile it")
        for chunk, box in found:
            stored = self._open(chunk["file"]).get_slice(name)
            if list(stored.get_shape()) != chunk["sizes"]:
                raise CorruptDirectory(
                    f"{self.directory / chunk['file']}: tensor {name!r} has shape "
                    f"{stored.get_shape()}, the index says {chunk['sizes']}")
            source = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, chunk["offsets"]))
            target = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, offsets))
            values = stored[source] if source else self._open(chunk["file"]).get_tensor(name)
            if values.dtype != out.dtype:
                raise CorruptDirectory(
                    f"{self.directory / chunk['file']}: tensor {name!r} is {values.dtype}, "
                    f"the index says {out.dtype}")
            out[target] = values
        return out

    def own(self, rank: int) -> tuple[dict[str, torch.Tensor], list]:
        """The RNG states rank `rank` wrote (rank 0's for a rank with no file: fewer ranks wrote
        it)."""
        file = rank_file(rank) if (self.directory / rank_file(rank)).is_file() else rank_file(0)
        handle = self._open(file)
        try:
            python = json.loads(handle.metadata()[PYTHON_RNG])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptDirectory(
                f"{self.directory / file}: no readable {PYTHON_RNG} metadata ({e})") from None
        return {k: handle.get_tensor(k) for k in handle.keys() if k.startswith("rng.")}, python
