"""JSONL readers for the training stages: each line becomes a text record, or a `DataError` naming
`file:line: reason` (or, with `skip_malformed`, is counted and dropped). Lines are decoded one by one,
so bytes that are not UTF-8 are such an error too.

Accepted lines:
- demonstration   {"prompt": str, "response": str}
- chat            {"messages": [{"role": ..., "content": ...}, ...]} ending with an assistant turn;
                  rendered by `engine.tokenization.render_chat` (the loss covers that last turn only)
- pairwise        {"prompt": str, "chosen": str, "rejected": str}
- ranking         {"prompt": str, "responses": [best, ..., worst]} with K >= 2 distinct responses
- hh              {"chosen": transcript, "rejected": transcript}: Anthropic HH-RLHF, where each
                  transcript is "\\n\\nHuman: ... \\n\\nAssistant: ...". The prompt is everything up
                  to and including the last "\\n\\nAssistant:" and must be the same in both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import FusedRLError

HH_ASSISTANT = "\n\nAssistant:"


class DataError(FusedRLError, ValueError):
    """A malformed data line: the message starts with `file:line:`."""


@dataclass(frozen=True)
class Demonstration:
    """One SFT example. `messages` is set for chat lines (then prompt/response are rendered later)."""

    prompt: str
    response: str
    messages: tuple | None = None


@dataclass(frozen=True)
class Ranking:
    """One preference example: responses ordered best first (pairwise is K = 2)."""

    prompt: str
    responses: tuple[str, ...]


@dataclass
class ReadResult:
    records: list
    skipped: int  # malformed lines dropped (only with skip_malformed)
    errors: list[str]  # their messages, for the log
    lines: list[int]  # the line number of each record, for errors found later (e.g. a prompt too long)


def _string(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def parse_demonstration(row: dict) -> Demonstration:
    if "messages" in row:
        return _parse_chat(row["messages"])
    if set(row) >= {"prompt", "response"}:
        response = _string(row, "response")
        if not response:
            raise ValueError("empty response")
        return Demonstration(_string(row, "prompt"), response)
    raise ValueError(f"expected keys prompt+response or messages, got {sorted(row)}")


def _parse_chat(messages) -> Demonstration:
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError("messages must be a list of at least two {role, content} turns")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"messages[{i}] must be an object with string role and content")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
        raise ValueError("the last message must be a non-empty assistant turn (it is the response)")
    turns = tuple((m["role"], m["content"]) for m in messages)
    return Demonstration("", messages[-1]["content"], turns)


def parse_preference(row: dict) -> Ranking:
    if "responses" in row:
        responses = row["responses"]
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            raise ValueError("responses must be a list of at least two strings, best first")
        if len(set(responses)) != len(responses):
            raise ValueError("responses must be distinct (a tie cannot be ranked)")
        return Ranking(_string(row, "prompt"), tuple(responses))
    if "prompt" in row and set(row) & {"chosen", "rejected"}:
        chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
        if chosen == rejected:
            raise ValueError("chosen and rejected are identical")
        return Ranking(_string(row, "prompt"), (chosen, rejected))
    if set(row) >= {"chosen", "rejected"}:
        return parse_hh(_string(row, "chosen"), _string(row, "rejected"))
    raise ValueError(f"expected keys prompt+chosen+rejected, prompt+responses or chosen+rejected "
                     f"(HH transcripts), got {sorted(row)}")


def parse_hh(chosen: str, rejected: str) -> Ranking:
    """Split two HH-RLHF transcripts into their shared prompt and the two final assistant turns."""
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"chosen transcript has no {HH_ASSISTANT!r} turn")
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt) or HH_ASSISTANT in rejected[len(prompt):]:
        raise ValueError("chosen and rejected transcripts do not share the dialogue before the last "
                         "assistant turn")
    pair = (chosen[len(prompt):], rejected[len(prompt):])
    if pair[0] == pair[1]:
        raise ValueError("chosen and rejected final turns are identical")
    return Ranking(prompt, pair)


_PARSERS = {"demonstration": parse_demonstration, "chat": parse_demonstration,
            "pairwise": parse_preference, "ranking": parse_preference, "hh": parse_preference}
_KEYS = {"demonstration": {"prompt", "response"}, "chat": {"messages"},
         "pairwise": {"prompt", "chosen", "rejected"}, "ranking": {"prompt", "responses"},
         "hh": {"chosen", "rejected"}}


def parser_for(stage: str, fmt: str):
    """The line parser for `stage` ("sft" or "rm") and data format (see DataConfig.format)."""
    if fmt == "auto":
        return parse_demonstration if stage == "sft" else parse_preference
    parse = _PARSERS[fmt]
    required = _KEYS[fmt]

    def strict(row: dict):
        if not required <= set(row):
            raise ValueError(f"format {fmt!r} needs keys {sorted(required)}, got {sorted(row)}")
        return parse(row)
    return strict


def numbered_lines(path, max_line_bytes: int | None = None):
    """(line number, raw bytes) of each non-blank line of `path`. Decoding is left to decode_line, per
    line, so that bytes which are not UTF-8 become an error with a line number. With
    `max_line_bytes`, a longer line is a DataError naming it, read no further than the cap."""
    limit = -1 if max_line_bytes is None else max_line_bytes + 2  # room for the line's own \r\n
    with Path(path).open("rb") as f:
        lineno = 0
        while raw := f.readline(limit):
            lineno += 1
            if max_line_bytes is not None and len(raw.rstrip(b"\r\n")) > max_line_bytes:
                raise DataError(f"{path}:{lineno}: longer than {max_line_bytes} bytes, the most "
                                "a line may hold here")
            if raw.strip():
                yield lineno, raw


def decode_line(raw: bytes) -> str:
    """A UTF-8 line without its line break; ValueError naming the first bad byte and its column."""
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def read_jsonl(path, parse, skip_malformed: bool = False) -> ReadResult:
    """Parse every non-blank line of `path` with `parse(dict) -> record`."""
    path = Path(path)
    records, lines, errors = [], [], []
    for lineno, raw in numbered_lines(path):
        try:
            row = json.loads(decode_line(raw))
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            records.append(parse(row))
            lines.append(lineno)
        except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError too
            message = f"{path}:{lineno}: {e if isinstance(e, ValueError) else 'JSON nested too deeply'}"
            if not skip_malformed:
                raise DataError(message) from None
            errors.append(message)
    if not records:
        raise DataError(f"{path}: no usable lines" + (f" ({len(errors)} malformed)" if errors else ""))
    return ReadResult(records, len(errors), errors, lines)
