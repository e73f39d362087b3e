"""RL prompts (PPO, GRPO): rows with a `prompt` -> token ids for the policy, every other column kept
for the reward functions.

A prompt is a string or a message list [{"role", "content"}, ...]. A message list goes through the
tokenizer's chat template with the generation prompt (data/chat.py's render_prompt: the rendering
SFT gave its prompts); so does a string, as one user turn, when data.chat_template=auto finds a
template in the tokenizer; with data.chat_template=none a string is the policy's text as it is (a
policy trained on plain prompt + completion strings). Each prompt keeps its last
rollout.max_prompt_length tokens and must leave room to generate within the model's context.

For a vision model (a VisionProcessor in place of the tokenizer) every row is read by
data/vision_rows.py: its images processed once into the PromptRow's `images`, whose tokens its ids
hold expanded; a prompt whose cut would reach an image is dropped and counted, never split.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UsageError
from .chat import has_template, render_prompt
from .loading import report
from .records import DataError, located, parse_turns
from .sources import read_records, source_name
from .tokenization import tokenize_prompt, tokenize_prompts
from .vision_processor import ImageInputs, VisionProcessor
from .vision_rows import parse_vision_row, tokenize_vision_prompt


@dataclass(frozen=True)
class PromptRow:
    """One RL prompt: the policy's token ids, the prompt as the data holds it (a string or a message
    list, what TRL-style reward functions receive as `prompts`), the row's other columns (a vision
    row's `images` among them, as the data holds them), its processed images (None: text) and its
    index in the run's prompts (load_prompts' list; None: a row built elsewhere), by which a
    checkpoint names a row with images instead of copying its pixels."""

    ids: list[int]
    prompt: str | list
    columns: dict = field(default_factory=dict)
    images: ImageInputs | None = None
    index: int | None = None


def column_lists(rows: list[PromptRow]) -> dict[str, list]:
    """The rows' other columns as {name: one value per row} (TRL passes each to a reward function as
    a keyword list); a column missing from a row is None there."""
    names = dict.fromkeys(name for row in rows for name in row.columns)
    return {name: [row.columns.get(name) for row in rows] for name in names}


def _parse(row: dict) -> tuple[str | list, dict]:
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        parse_turns(prompt, "prompt")
    elif not isinstance(prompt, str) or not prompt:
        got = type(prompt).__name__ if "prompt" in row else f"the columns {sorted(row)}"
        raise ValueError('expected a non-empty string or a message list in column "prompt", got '
                         f"{got}")
    return prompt, {k: v for k, v in row.items() if k != "prompt"}


def prompt_text(tokenizer, prompt: str | list, chat_template: str) -> str:
    """The text the policy continues for `prompt` (see the module docstring)."""
    if isinstance(prompt, list):
        return render_prompt(tokenizer, parse_turns(prompt, "prompt"))
    if chat_template == "auto" and has_template(tokenizer):
        return render_prompt(tokenizer, (("user", prompt),))
    return prompt


def load_prompts(source, tokenizer, max_prompt_length: int, max_model_len: int,
                 truncate_to_context: bool = False, prompt_column: str = "prompt",
                 chat_template: str = "auto") -> tuple[list[PromptRow], int]:
    """Every prompt of `source` (a data file or a datasets.Dataset, column `prompt_column`) as a
    PromptRow, and how many were cut to fit the context.

    A prompt must leave room for at least one generated token within max_model_len: otherwise a
    DataError naming its row, or with truncate_to_context its last max_model_len - 1 tokens.
    """
    columns = {"prompt": prompt_column} if prompt_column != "prompt" else None
    vision = isinstance(tokenizer, VisionProcessor)
    if vision and chat_template == "none":
        raise UsageError("data.chat_template=none with a vision-language policy: every prompt "
                         "goes through its chat template, which writes each image's tokens; leave "
                         "data.chat_template=auto")
    read = read_records(source, _vision_parser(tokenizer, source) if vision else _parse,
                        columns=columns)
    text_ids = None if vision else iter(_text_prompt_ids(read, tokenizer, max_prompt_length,
                                                         chat_template))
    prompts, truncated, dropped = [], 0, 0
    for (prompt, extra), where in zip(read.records, read.where):
        pixels = None
        if vision:
            encoded = located(where, tokenize_vision_prompt, tokenizer, prompt, max_prompt_length)
            if encoded is None:
                dropped += 1
                continue
            (ids, pixels), prompt = encoded, extra.pop("prompt")
        else:
            ids = next(text_ids)
        if len(ids) >= max_model_len:
            if not truncate_to_context:
                raise DataError(f"{where}: the prompt has {len(ids)} tokens, which leaves no room "
                                f"to generate within the model's context of {max_model_len}; "
                                "shorten it, lower rollout.max_prompt_length, or set "
                                "rollout.truncate_prompts=true")
            if pixels is not None:
                dropped += 1
                continue
            ids, truncated = ids[-(max_model_len - 1):], truncated + 1
        prompts.append(PromptRow(ids, prompt, extra, pixels, len(prompts)))
    _report_dropped(source, dropped, max_prompt_length, max_model_len)
    if not prompts:
        raise DataError(f"{source_name(source)}: no prompts left once those whose cut would reach "
                        "an image were dropped")
    strings = sum(isinstance(p.prompt, str) for p in prompts)
    if strings and chat_template == "auto" and not vision and has_template(tokenizer):
        # Said once: a policy trained on plain strings would otherwise meet a format it never saw.
        report(f"{source_name(source)}: {strings} string prompt(s) go through the tokenizer's chat "
               "template as a user turn (data.chat_template=auto; none keeps them as they are)")
    if truncated:
        report(f"{source_name(source)}: {truncated} prompt(s) cut to their last "
               f"{max_model_len - 1} tokens to fit the model's context "
               "(rollout.truncate_prompts=true)")
    return prompts, truncated


def _text_prompt_ids(read, tokenizer, max_prompt_length: int,
                     chat_template: str) -> list[list[int]]:
    """The ids of every text row's prompt, their texts in one call of the tokenizer
    (tokenization.tokenize_prompts); a DataError naming the row that cannot be rendered or
    encoded."""
    texts = [located(where, prompt_text, tokenizer, prompt, chat_template)
             for (prompt, _), where in zip(read.records, read.where)]
    try:
        return tokenize_prompts(tokenizer, texts, max_prompt_length)
    except ValueError:  # found again one prompt at a time, for its row
        return [located(where, tokenize_prompt, tokenizer, text, max_prompt_length)
                for text, where in zip(texts, read.where)]


def _vision_parser(processor: VisionProcessor, source):
    """A vision row -> (its VisionRecord, the other columns with the prompt as the data holds it
    under "prompt", for the PromptRow)."""
    from pathlib import Path

    from .sources import is_dataset

    base = None if is_dataset(source) else Path(source).parent

    def parse(row: dict):
        record = parse_vision_row(row, processor, base, with_response=False)
        return record, {"prompt": row.get("prompt"), **{k: v for k, v in row.items()
                                                       if k != "prompt"}}
    return parse


def _report_dropped(source, dropped: int, max_prompt_length: int, max_model_len: int) -> None:
    if dropped:
        report(f"{source_name(source)}: dropped {dropped} prompt(s) with images longer than "
               f"rollout.max_prompt_length={max_prompt_length} (or the context of "
               f"{max_model_len}): their cut would reach an image, which is never split")
