"""Prompts with images in the paged engine: their M-RoPE positions, and their image features placed
in a forward's rows, the tower run once per distinct set of images in a run.

A sequence's prompt positions come from vision/mrope.py when it is queued (`attach_positions`);
every token after the prompt (sampled, carried or an environment's text) sits at token index +
rope_delta on all three axes, which is what a decode step's 1-D positions hold, so decode runs the
text model's kernels and CUDA graphs unchanged. A prefill, a prompt's chunk or a verify step
forwards spans [start, end) of sequences: `span_positions` gives their [3, N] positions and
`ImageCache.visual_rows` the features of the image tokens inside them (a chunk that cuts an image
takes the rows it holds). Images are known by a digest of their pixels and grids (`image_key`):
the tower runs once per digest in a run, so once for a prompt's n samples, and block_manager keys
the KV blocks by it too (the same placeholder tokens over other pixels are other K/V).
"""
from __future__ import annotations

import hashlib

import torch

from ..data.device_tensors import device_tensor
from ..model.vision.mrope import sequence_positions
from ..model.vision.rows import VisualRows
from ..model.vision.tower import ImageFeatures
from .request import Request
from .sequence import Sequence


def check_images(request: Request, config, index: int) -> None:
    """A one-line ValueError naming prompts[index] when its images and its placeholder tokens
    disagree, or it has images (or placeholders) and the model takes no images."""
    spec = config.vision
    if spec is None:
        if request.images is not None:
            raise ValueError(f"prompts[{index}] has images but the model ({config.model_type}) "
                             "is a text model")
        return
    grids = [] if request.images is None else request.images.image_grid_thw.tolist()
    sequence_positions(list(request.prompt), grids, spec, where=f"prompts[{index}]")
    if spec.image_token_id in request.answer:
        raise ValueError(f"answers[{index}] holds image placeholder tokens: images belong in the "
                         "prompt")


def image_digest(images) -> str:
    """sha256 of images' grids, pixel dtype and pixel bytes."""
    digest = hashlib.sha256(torch.as_tensor(images.image_grid_thw, dtype=torch.int64).cpu()
                            .contiguous().numpy().tobytes())
    pixels = images.pixel_values.detach().cpu().contiguous()
    digest.update(str(pixels.dtype).encode())
    digest.update(pixels.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def attach_positions(seq: Sequence, config, cache: "ImageCache | None") -> None:
    """Set a vision-language model's sequence's M-RoPE prompt positions, decode offset and image
    key (cache: the runner's, which digests each images object once a run)."""
    if config.vision is None:
        return
    if seq.images is not None:
        seq.image_key = cache.key_of(seq.images)
    grids = [] if seq.images is None else seq.images.image_grid_thw.tolist()
    prompt = seq.token_ids[:seq.num_prompt_tokens]
    seq.mrope, seq.rope_delta = sequence_positions(prompt, grids, config.vision)


def span_positions(seq: Sequence, start: int, end: int) -> list[list[int]]:
    """[3][end - start]: the M-RoPE positions of tokens [start, end) of `seq`."""
    cut = min(end, len(seq.mrope[0]))
    tail = [p + seq.rope_delta for p in range(max(start, cut), end)]
    return [axis[start:cut] + tail for axis in seq.mrope]


class ImageCache:
    """The tower's output per set of images (by image_digest) for one run of the engine."""

    def __init__(self, model):
        self.model = model
        self.features: dict[str, tuple[ImageFeatures, list[int]]] = {}
        # id(images) -> (images, digest): kept alive for the run, so an id is never reused in it
        self.keys: dict[int, tuple[object, str]] = {}

    def clear(self) -> None:
        self.features.clear()
        self.keys.clear()

    def key_of(self, images) -> str:
        """image_digest(images), computed once per images object in a run."""
        if id(images) not in self.keys:
            self.keys[id(images)] = (images, image_digest(images))
        return self.keys[id(images)][1]

    def _of(self, seq: Sequence) -> tuple[ImageFeatures, list[int]]:
        """(features, the prompt index of each feature row's placeholder token) of seq's images."""
        key = seq.image_key
        if key not in self.features:
            images = seq.images
            features = self.model.encode_images(images.pixel_values, images.image_grid_thw)
            image_id = self.model.config.vision.image_token_id
            tokens = [p for p, t in enumerate(seq.token_ids[:seq.num_prompt_tokens])
                      if t == image_id]
            self.features[key] = (features, tokens)
        return self.features[key]

    def visual_rows(self, spans: list[tuple[Sequence, int, int]], device) -> VisualRows | None:
        """The features of the image tokens inside the packed spans [(seq, start, end)] (rows laid
        out span after span), or None when none holds one."""
        rows, parts, offset = [], [], 0
        for seq, start, end in spans:
            if seq.images is not None and start < seq.num_prompt_tokens:
                features, tokens = self._of(seq)
                picked = [i for i, p in enumerate(tokens) if start <= p < end]
                if picked:
                    rows += [offset + tokens[i] - start for i in picked]
                    parts.append(features.rows(device_tensor(picked, torch.int64,
                                                             features.embeds.device)))
            offset += end - start
        if not parts:
            return None
        joined = ImageFeatures(torch.cat([p.embeds for p in parts]),
                               tuple(torch.cat(d) for d in zip(*(p.deepstack for p in parts))))
        return VisualRows(device_tensor(rows, torch.int64, device), joined)
