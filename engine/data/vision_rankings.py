"""Reward-model rows with images -> rankings, and a ranking -> one processed sample.

A row is TRL's preference format with an `images` (or `image`) column: a `prompt` (a string, or
a message list whose image parts take the images; vision_rows.py's rules) and either `chosen` and
`rejected` or `responses` (best first, K >= 2). A response is a string or a list of one assistant
message whose content is text (a string or text parts): the images belong to the prompt, so an
image part in a response is refused, as is a vision token's string in its text, naming nothing
(the loader adds the row). The K responses share the prompt, its ids and its pixels: the images
are processed once per row, and each of the K sequences of the ranking carries the same
ImageInputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .tokenization import TokenizedExample, tokenize_response
from .vision_processor import VisionProcessor
from .vision_rows import VisionRecord, parse_vision_row, tokenize_vision_prompt


@dataclass(frozen=True)
class VisionRanking:
    """A ranking with images: the prompt as a VisionRecord (its messages and images) and the
    responses' texts, best first."""

    prompt: VisionRecord
    responses: tuple[str, ...]


def parse_vision_ranking(row: dict, processor: VisionProcessor, base: Path | None
                         ) -> VisionRanking:
    """A reward-model row with images -> VisionRanking (see the module docstring)."""
    if "responses" in row:
        answers = row["responses"]
        if not isinstance(answers, list) or len(answers) < 2:
            raise ValueError("responses must be a list of at least two responses, best first")
        keys = [f"responses[{k}]" for k in range(len(answers))]
    elif "chosen" in row and "rejected" in row:
        answers, keys = [row["chosen"], row["rejected"]], ["chosen", "rejected"]
    else:
        raise ValueError("a reward-model row with images needs a prompt and chosen + rejected, or "
                         f"a prompt and responses (best first); got the columns {sorted(row)}")
    texts = tuple(_response_text(a, key, processor) for a, key in zip(answers, keys))
    if len(set(texts)) != len(texts):
        raise ValueError("the responses must be distinct (a tie cannot be ranked)")
    return VisionRanking(parse_vision_row(row, processor, base, with_response=False), texts)


def _response_text(answer, key: str, processor: VisionProcessor) -> str:
    """One response (a string, or [one assistant message] of text) -> its text, checked."""
    if isinstance(answer, list):
        if len(answer) != 1 or not isinstance(answer[0], dict) or answer[0].get(
                "role") != "assistant":
            raise ValueError(f"{key} must be a string or one assistant message")
        content = answer[0].get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list) or not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in parts):
            raise ValueError(f"{key}'s content must be text (a string or text parts): images "
                             "belong to the prompt")
        answer = "".join(p["text"] for p in parts)
    if not isinstance(answer, str) or not answer:
        raise ValueError(f"{key} must be a non-empty string or one assistant message, got "
                         f"{type(answer).__name__}")
    processor.check_text(answer)
    return answer


def tokenize_vision_ranking(processor: VisionProcessor, ranking: VisionRanking, max_length: int,
                            max_prompt_length: int) -> TokenizedExample | None:
    """A VisionRanking -> TokenizedExample (the prompt's ids and pixels once, K responses); None
    when the prompt's cut would reach an image or a response has no room (dropped and counted by
    the loader)."""
    prompt = tokenize_vision_prompt(processor, ranking.prompt, max_prompt_length)
    if prompt is None:
        return None
    ids, pixels = prompt
    responses = tuple(tokenize_response(processor.tokenizer, r, max_length - len(ids))
                      for r in ranking.responses)
    if any(not r for r in responses):
        return None
    return TokenizedExample(ids, responses, images=pixels)
