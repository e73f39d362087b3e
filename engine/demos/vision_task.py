"""The vision demo's task, data and model, built from nothing: count the coloured squares in a
picture. A 24 x 16 image holds a 2 x 3 grid of 8 x 8 cells, each empty (white) or a red, green
or blue square; "how many squares ?" is answered by a digit, 0 to 6, and a program judges it.
Everything is made here: the pictures (PIL), a word-level Hugging Face tokenizer with the Qwen-VL
vision tokens and a chat template, a Qwen2-VL image processor (4-pixel patches merged 2 x 2, so
one image token per cell), noisy demonstrations and prompts in TRL's format. The recipe and the
tiny random Qwen2.5-VL it trains are engine/demos/vision.py's.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220)}
EMPTY = (255, 255, 255)
ROWS, COLUMNS, CELL_PIXELS = 2, 3, 8   # a 2 x 3 grid of 8-pixel cells: a 24 x 16 picture
CELLS = ROWS * COLUMNS
DIGITS = [str(d) for d in range(CELLS + 1)]
# In the order of the model config's ids (image, video, vision start, vision end: consecutive
# from image_token_id, engine/model/vision/tiny.py).
VISION = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"]
TURNS = ["<|im_start|>", "<|im_end|>"]
SPECIAL = ["<pad>", "<s>", "</s>"]
WORDS = ["user", "assistant", "how", "many", "squares", "?", *DIGITS]
# The template writes an image part as the vision start, the image token and the vision end, as
# Qwen2.5-VL's does (the processor expands the image token to one per merged patch).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }} "
    "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
    "{% if p.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ p.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


# --- the task ----------------------------------------------------------------------------------

def draw(cells: list[str | None]):
    """The picture of ROWS x COLUMNS cells (row-major colour names, None: empty), a PIL image."""
    from PIL import Image

    image = Image.new("RGB", (COLUMNS * CELL_PIXELS, ROWS * CELL_PIXELS), EMPTY)
    for i, colour in enumerate(cells):
        if colour is not None:
            x, y = (i % COLUMNS) * CELL_PIXELS, (i // COLUMNS) * CELL_PIXELS
            image.paste(COLOURS[colour], (x, y, x + CELL_PIXELS, y + CELL_PIXELS))
    return image


QUESTION = "how many squares ?"


def task_messages(task: dict) -> list[dict]:
    """A task's prompt in TRL's conversational format: the picture's part, then its question
    (the task's "question", else QUESTION)."""
    return [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": task.get("question", QUESTION)}]}]


def is_correct(answer: int, response: str) -> bool:
    """The program's judgement: the response is the count, one digit."""
    return response.split() == [str(answer)]


def make_tasks(n: int, rng: random.Random, exclude: set = frozenset(),
               counted: frozenset = frozenset(COLOURS)) -> list[dict]:
    """n distinct pictures, none of `exclude`, as tasks {"cells", "answer"}: each cell empty or a
    square of a random colour, alike likely, the answer the number of squares whose colour is
    `counted` (default: every square)."""
    possible = (len(COLOURS) + 1) ** CELLS - len(exclude)
    if n > possible:
        raise ValueError(f"{n} distinct pictures asked for, but only {possible} are left")
    out, seen = [], set(exclude)
    while len(out) < n:
        cells = tuple(rng.choice(list(COLOURS)) if rng.random() < 0.5 else None
                      for _ in range(CELLS))
        if cells not in seen:
            seen.add(cells)
            out.append({"cells": cells, "answer": sum(c in counted for c in cells)})
    return out


def write_vision_data(train_prompts: int, eval_prompts: int, noise: float, seed: int,
                      data_dir: Path, counted: frozenset = frozenset(COLOURS),
                      question: str = QUESTION) -> dict:
    """PNG pictures and JSONL rows in TRL's format (an `images` column of paths, a `prompt` message
    list with an image part): noisy demonstrations (a `noise` fraction answer a wrong count), GRPO
    prompts with their `answer` column, and held-out tasks; `counted` and `question` as in
    make_tasks and task_messages (default: every square, QUESTION)."""
    rng = random.Random(seed)
    train = make_tasks(train_prompts, rng, counted=counted)
    held_out = make_tasks(eval_prompts, rng, exclude={t["cells"] for t in train}, counted=counted)
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    for i, task in enumerate(train + held_out):
        task["image"] = f"images/{i}.png"
        task["question"] = question
        draw(list(task["cells"])).save(data_dir / task["image"])
    demos, prompts = [], []
    for task in train:
        shown = task["answer"]
        if rng.random() < noise:
            shown = rng.choice([d for d in range(len(DIGITS)) if d != shown])
        prompt = task_messages(task)
        demos.append({"prompt": prompt, "completion": str(shown), "images": [task["image"]]})
        prompts.append({"prompt": prompt, "images": [task["image"]], "answer": task["answer"]})
    return {"sft": _write_jsonl(data_dir / "demonstrations.jsonl", demos),
            "prompts": _write_jsonl(data_dir / "prompts.jsonl", prompts),
            "held_out": held_out, "dir": data_dir}


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def count_reward(completions: list, answer: list[int], **_) -> list[float]:
    """The GRPO reward, a TRL-style reward function: 1.0 for the right count, else 0.0. The prompts
    are conversational, so each completion is TRL's [{"role": "assistant", "content": text}]."""
    return [float(is_correct(a, c[-1]["content"] if isinstance(c, list) else c))
            for c, a in zip(completions, answer)]


# --- the model ---------------------------------------------------------------------------------

def build_vision_tokenizer(words: list[str] = WORDS):
    """A word-level `PreTrainedTokenizerFast` over `words` with the Qwen-VL vision and turn tokens
    as special tokens and CHAT_TEMPLATE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = SPECIAL + TURNS + VISION + [w for w in words if w not in SPECIAL + TURNS + VISION]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>",
                                        additional_special_tokens=TURNS + VISION)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_image_processor(patch_size: int = 4, merge_size: int = 2):
    """A Qwen2-VL image processor (PIL backend: no torchvision) whose pictures of the task's size
    are not resized: one merged token per cell."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)

    factor = patch_size * merge_size
    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge_size,
                                    temporal_patch_size=2, min_pixels=factor * factor,
                                    max_pixels=(4 * factor) ** 2)


def build_vision_processor(words: list[str] = WORDS):
    """The demo's VisionProcessor: build_vision_tokenizer and build_image_processor."""
    from ..data.vision_processor import VisionProcessor

    return VisionProcessor(build_vision_tokenizer(words), build_image_processor())
