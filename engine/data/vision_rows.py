"""Rows with images (TRL's vision-language formats) -> records, and records -> one processed sample.

A row's images are its `images` column (a list) or `image` column (one): PIL images (a datasets
Image column), paths (relative to the data file's folder), or {"bytes", "path"} objects (an Image
column read without decoding). Its text is
- messages (`messages`, or `prompt` [+ `completion`] message lists) whose contents are strings or
  part lists: {"type": "image"} marks where an image goes, {"type": "text", "text"} is text. The
  k-th image part takes the k-th image. Messages with no image part and images in the row get them
  before the text of the first user message (TRL's prepare_multimodal_messages);
- or a string `prompt` (+ `completion` / `response`): one user turn, the images before its text.
The rules, each a ValueError naming nothing (the caller adds the row):
- as many image parts as images, else "N image part(s) ... but M image(s)";
- no text (a message's, a completion's) may hold a vision token's string
  (VisionProcessor.check_text): refused, never escaped, so a typed "<|image_pad|>" can neither
  become an image slot nor a token the model learns to write (data.skip_malformed drops and counts
  such rows);
- an image in a trained assistant turn is refused: the images belong to the prompt.
Truncation never splits an image: a prompt longer than its limit keeps its last tokens only when
the cut leaves every vision token; otherwise the sample is dropped, and the loaders count it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from .tokenization import TokenizedExample, tokenize_response
from .vision_processor import ImageInputs, VisionProcessor


@dataclass(frozen=True)
class VisionRecord:
    """A row with images: the prompt's messages (contents normalized to part lists), its images
    (PIL, RGB) in slot order, and for SFT the trained assistant text (None for an RL prompt)."""

    messages: tuple
    images: tuple
    response: str | None = None


def has_images(row: dict) -> bool:
    """Whether `row` is a vision row: an images/image column that is set, or an image part."""
    if row.get("images") is not None or row.get("image") is not None:
        return True
    lists = [v for k in ("messages", "prompt", "completion") if isinstance(v := row.get(k), list)]
    return any(_is_image_part(p) for messages in lists for m in messages if isinstance(m, dict)
               and isinstance(m.get("content"), list) for p in m["content"])


def _is_image_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def row_images(row: dict, base: Path | None) -> list:
    """The row's images, opened as RGB PIL images."""
    value = row.get("images")
    if value is None:
        value = [] if row.get("image") is None else [row["image"]]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"column 'images' must be a list of images, got {type(value).__name__}")
    return [open_image(v, base, i) for i, v in enumerate(value)]


def open_image(value, base: Path | None, index: int = 0):
    """A PIL image, a path or a {"bytes", "path"} object -> an RGB PIL image."""
    from PIL import Image, ImageOps

    if isinstance(value, Image.Image):
        return as_rgb(value)
    if isinstance(value, dict) and value.get("bytes") is not None:
        source = io.BytesIO(value["bytes"])
    elif isinstance(value, (str, dict)) and isinstance(path := value if isinstance(value, str)
                                                       else value.get("path"), str) and path:
        source = Path(path) if base is None or Path(path).is_absolute() else base / path
        if not source.is_file():
            raise ValueError(f"images[{index}]: no image file {str(source)!r}")
    else:
        raise ValueError(f"images[{index}] is a {type(value).__name__}: expected a PIL image, a "
                         'path or a {"bytes", "path"} object')
    try:
        with Image.open(source) as image:
            # as transformers' load_image: the camera's EXIF orientation applied
            return as_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"images[{index}] cannot be read as an image: {e}") from None


def as_rgb(image):
    """An RGB copy of a PIL image as transformers' image processors make it (convert_to_rgb): an
    image with transparency composited over white, not its hidden colour."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def normalize_messages(messages, processor: VisionProcessor, key: str = "messages") -> list[dict]:
    """[{"role", "content": str | parts}] -> the same with every content a list of image and text
    parts, each text checked for vision tokens."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field {key!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise ValueError(f"{key}[{i}] must be an object with a string role and a content")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ValueError(f"{key}[{i}].content must be a string or a list of parts, got "
                             f"{type(content).__name__}")
        content = [_part(p, processor, f"{key}[{i}]") for p in parts]
        check_joined_text(content, processor)
        out.append({"role": m["role"], "content": content})
    return out


def check_joined_text(content: list[dict], processor: VisionProcessor) -> None:
    """Each run of text parts as the chat template writes it (one after the other, nothing
    between them) checked for vision tokens: "<|vision_" then "pad|>" in two parts is the token."""
    run = ""
    for part in content + [{"type": "image"}]:
        if part["type"] == "text":
            run += part["text"]
        elif run:
            processor.check_text(run)
            run = ""


def _part(part, processor: VisionProcessor, where: str) -> dict:
    if _is_image_part(part):
        return {"type": "image"}
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        processor.check_text(part["text"])
        return {"type": "text", "text": part["text"]}
    raise ValueError(f"{where} has the part {str(part)[:80]!r}: expected "
                     '{"type": "image"} or {"type": "text", "text": str}')


def place_images(messages: list[dict], count: int) -> list[dict]:
    """Messages with as many image parts as `count` images; with none, the images go before the
    first user message's text (TRL's rule); otherwise ValueError naming both counts."""
    parts = sum(_is_image_part(p) for m in messages for p in m["content"])
    if parts == 0 and count:
        user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if user is None:
            raise ValueError(f"{count} image(s) but no user message to hold them")
        messages[user]["content"] = [{"type": "image"}] * count + messages[user]["content"]
    elif parts != count:
        raise ValueError(f"{parts} image part(s) in the messages but {count} image(s) in the "
                         "images column")
    return messages


def parse_vision_row(row: dict, processor: VisionProcessor, base: Path | None,
                     with_response: bool) -> VisionRecord:
    """A vision row -> VisionRecord (see the module docstring); with_response: an SFT row, whose
    last assistant turn (or completion / response) is the trained text."""
    prompt, completion = _prompt_and_completion(row, with_response)
    messages = (normalize_messages(prompt, processor, "prompt" if "messages" not in row
                                   else "messages") if isinstance(prompt, list)
                else normalize_messages([{"role": "user", "content": prompt}], processor))
    response = None
    if with_response:
        if isinstance(completion, list):
            messages += normalize_messages(completion, processor, "completion")
        if messages[-1]["role"] != "assistant" and not isinstance(completion, str):
            raise ValueError("the last message must be the assistant's answer (the trained text)")
        if isinstance(completion, str):
            processor.check_text(completion)
            response = completion
        else:
            last = messages.pop()["content"]
            if any(_is_image_part(p) for p in last):
                raise ValueError("the trained assistant turn holds an image part: images belong "
                                 "to the prompt")
            response = "".join(p["text"] for p in last)  # its parts checked joined above
        if not response:
            raise ValueError("empty response")
    images = row_images(row, base)
    return VisionRecord(tuple(place_images(messages, len(images))), tuple(images), response)


def _prompt_and_completion(row: dict, with_response: bool):
    if "messages" in row:
        return row["messages"], None
    prompt = row.get("prompt")
    if not (isinstance(prompt, list) or (isinstance(prompt, str) and prompt)):
        raise ValueError("expected a messages column, or a prompt (a non-empty string or a message "
                         f"list), got the columns {sorted(row)}")
    completion = row.get("completion", row.get("response")) if with_response else None
    if with_response and not isinstance(completion, (str, list)):
        raise ValueError("an SFT row with images needs messages ending in the assistant's answer, "
                         "or a completion (or response) column")
    return prompt, completion


def tokenize_vision_prompt(processor: VisionProcessor, record: VisionRecord,
                           max_prompt_length: int) -> tuple[list[int], ImageInputs | None] | None:
    """The prompt's ids (each image's tokens expanded) and pixels; longer than max_prompt_length,
    its last tokens when the cut leaves every vision token, else None (the sample is dropped)."""
    text = processor.render(list(record.messages), generation_prompt=True)
    ids, pixels = processor.encode(text, list(record.images))
    if len(ids) <= max_prompt_length:
        return ids, pixels
    cut = len(ids) - max_prompt_length
    if any(t in processor.reserved_ids for t in ids[:cut]):
        return None
    return ids[cut:], pixels


def tokenize_vision_record(processor: VisionProcessor, record: VisionRecord, max_length: int,
                           max_prompt_length: int) -> TokenizedExample | None:
    """An SFT VisionRecord -> TokenizedExample with its images; None when the prompt's cut would
    reach an image or no response token fits (both dropped and counted by the loader)."""
    prompt = tokenize_vision_prompt(processor, record, max_prompt_length)
    if prompt is None:
        return None
    ids, pixels = prompt
    response = tokenize_response(processor.tokenizer, record.response, max_length - len(ids))
    return TokenizedExample(ids, (response,), images=pixels) if response else None
