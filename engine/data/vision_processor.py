"""A vision-language model's processor: its tokenizer, its image processor and the vision tokens,
turning one rendered prompt and its images into the sample's token ids and pixels, once.

Qwen2-VL's family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): a chat template writes one image token
(`<|image_pad|>`, between `<|vision_start|>` and `<|vision_end|>`) per image; the image processor
cuts an image into patches (`image_grid_thw` = temporal, height, width patches) and the patch
merger joins merge_size x merge_size of them into one token, so the image token is repeated
t*h*w / merge_size**2 times. The expansion is done here, from the grid the image processor gave
for that image, and then checked against the ids (one token per merged patch, one
`<|vision_start|>` per image): a sample can never hold tokens expanded twice or an image without
its slots.

transformers' `Qwen2_5_VLProcessor` does the same expansion, but it needs torchvision to be built
at all (its video processor); the tokenizer and the image processor are what the expansion needs,
so they are taken on their own (from the model directory, or built in code).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# The Qwen-VL family's vision tokens: never typed in text, never sampled.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                 "<|video_pad|>")
IMAGE_TOKEN, VISION_START = "<|image_pad|>", "<|vision_start|>"


@dataclass(frozen=True)
class ImageInputs:
    """A sample's images as the vision tower takes them: pixel_values [patches, channels *
    temporal_patch * patch * patch] (float32, every image's patches back to back) and image_grid_thw
    [images, 3] int64 (each image's temporal, height and width patches)."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    @property
    def num_images(self) -> int:
        return int(self.image_grid_thw.shape[0])


class VisionProcessor:
    """A tokenizer and an image processor with the vision tokens they share. `tokenizer` has the
    vision tokens of VISION_TOKENS (at least the image token and <|vision_start|>) as special
    tokens and a chat template that writes an image part as one image token; `image_processor` is
    a Qwen2-VL image processor (patch_size, merge_size, temporal_patch_size)."""

    def __init__(self, tokenizer, image_processor, chat_template: str | None = None):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IMAGE_TOKEN, VISION_START) if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer has no {missing[0]!r} token: a Qwen-VL processor "
                             f"needs {IMAGE_TOKEN!r} and {VISION_START!r} in its vocabulary")
        # Every vision token string the tokenizer knows, and any it names as its image/video token.
        named = [getattr(tokenizer, a, None) for a in ("image_token", "video_token")]
        self.reserved = tuple(dict.fromkeys(t for t in (*VISION_TOKENS, *named)
                                            if isinstance(t, str) and t in vocab))
        self.reserved_ids = frozenset(vocab[t] for t in self.reserved)
        self.image_token_id, self.vision_start_id = vocab[IMAGE_TOKEN], vocab[VISION_START]
        self.merge_size = int(image_processor.merge_size)

    @classmethod
    def from_pretrained(cls, path, tokenizer=None) -> "VisionProcessor":
        """The image processor (preprocessor_config.json) of a model directory with `tokenizer`
        (default: the directory's, by AutoTokenizer); the chat template the directory's
        chat_template.jinja / .json, else the tokenizer's."""
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        if not is_vision_directory(path):
            raise ValueError(f"{path} has no preprocessor_config.json: a vision model directory "
                             "holds its image processor's config")
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)
        return cls(tokenizer, image_processor, _directory_template(path))

    def check_model(self, spec, where: str) -> None:
        """ValueError naming `where` (the model's directory) when its config.json's vision token
        ids (`spec`: model/vision/spec.py's VisionSpec) are not this tokenizer's ids of those
        tokens: the model would read another token as an image slot, and the sampler mask
        another."""
        vocab = self.tokenizer.get_vocab()
        for field, token in (("image_token_id", IMAGE_TOKEN),
                             ("vision_start_token_id", VISION_START),
                             ("vision_end_token_id", "<|vision_end|>"),
                             ("video_token_id", "<|video_pad|>")):
            given = getattr(spec, field)
            if token in vocab and given != vocab[token]:
                raise ValueError(
                    f"{where}: config.json's {field} is {given}, but its tokenizer's {token!r} is "
                    f"{vocab[token]}: the two must name the same token (the model reads that id "
                    "as the image slot, the sampler never draws it)")

    @classmethod
    def of(cls, processor) -> "VisionProcessor":
        """A VisionProcessor as it is; a transformers processor (anything with .tokenizer and
        .image_processor) taken apart into those two."""
        if isinstance(processor, cls):
            return processor
        if hasattr(processor, "tokenizer") and hasattr(processor, "image_processor"):
            return cls(processor.tokenizer, processor.image_processor,
                       getattr(processor, "chat_template", None))
        raise TypeError(f"expected a VisionProcessor or a transformers processor with a tokenizer "
                        f"and an image processor, got {type(processor).__name__}")

    def check_text(self, text: str) -> None:
        """ValueError when `text` (a message's or a completion's) holds a vision token's string:
        typed text never becomes an image slot (docs/vision.md)."""
        for token in self.reserved:
            if token in text:
                raise ValueError(
                    f"the text holds the literal {token!r}, a vision token: an image is a "
                    '{"type": "image"} content part with its picture in the images column; '
                    f"text near it: {text[max(0, text.find(token) - 30):][:80]!r}")

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        """Messages whose contents are strings or part lists ({"type": "image"} | {"type": "text",
        "text"}) -> the chat template's text, one image token per image part."""
        if not self.chat_template:
            raise ValueError("the tokenizer has no chat template, which messages with images need "
                             "(it writes each image part as the image token)")
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=generation_prompt)

    def pixels(self, images: list) -> ImageInputs:
        """PIL images -> their patches and grids (the image processor, once for the sample)."""
        out = self.image_processor(images=images, return_tensors="pt")
        return ImageInputs(out["pixel_values"].float().contiguous(),
                           out["image_grid_thw"].to(torch.int64).reshape(-1, 3))

    def tokens_per_image(self, images: ImageInputs) -> list[int]:
        """Image tokens of each image: its merged patches."""
        return [int(n) // self.merge_size ** 2 for n in images.image_grid_thw.prod(dim=1).tolist()]

    def encode(self, text: str, images: list, special: bool = True) -> tuple[list[int],
                                                                              ImageInputs | None]:
        """Rendered text with one image token per image -> (ids with each image token repeated for
        its merged patches, the images' pixels); ValueError when the counts disagree."""
        slots = text.count(IMAGE_TOKEN)
        if slots != len(images):
            raise ValueError(f"{slots} image slot(s) in the rendered prompt but {len(images)} "
                             "image(s)")
        if not images:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"]), None
        pixels = self.pixels(images)
        counts = self.tokens_per_image(pixels)
        pieces = text.split(IMAGE_TOKEN)
        expanded = pieces[0] + "".join(IMAGE_TOKEN * n + piece
                                       for n, piece in zip(counts, pieces[1:]))
        ids = list(self.tokenizer(expanded, add_special_tokens=special)["input_ids"])
        if ids.count(self.image_token_id) != sum(counts) or (
                ids.count(self.vision_start_id) != len(images)):
            raise ValueError(
                f"the ids hold {ids.count(self.image_token_id)} image tokens and "
                f"{ids.count(self.vision_start_id)} {VISION_START!r} for {len(images)} image(s) of "
                f"{sum(counts)} tokens: the chat template must write each image part as "
                f"{VISION_START}{IMAGE_TOKEN}<|vision_end|>")
        return ids, pixels

    def save_pretrained(self, path) -> None:
        """The tokenizer (with the chat template) and preprocessor_config.json into `path`."""
        if self.chat_template:
            self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


def is_vision_directory(path) -> bool:
    """Whether model directory `path` holds an image processor's config (a vision model's)."""
    return (Path(path) / "preprocessor_config.json").is_file()


def _directory_template(path: Path) -> str | None:
    """A processor's own chat template file in `path` (transformers writes one of these two)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get(
            "chat_template")
    return None
