"""Rows of a data set (dicts, from data/sources.py) to the text records the stages tokenize.

SFT rows (data.format, `auto` decides per row by its keys, in this order):
- chat               {"messages": [{"role", "content"}, ...]} ending with an assistant turn; every
                     assistant turn is trained (TRL's assistant_only_loss), or the last one only
                     (data.train_on=last_turn); rendered by data/chat.py. Assistant messages may
                     carry `tool_calls` (OpenAI/TRL shape, their tokens trained), `tool` messages
                     answer them (context), and a `tools` column (JSON schemas) goes to the template
- prompt_completion  {"prompt", "completion"}: two strings (joined as they are), or two message
                     lists (the chat template applied; the completion's assistant turns trained)
- demonstration      {"prompt": str, "response": str}
- text               {"text": str}: plain language modeling, every token trained
Reward-model rows:
- pairwise           {"prompt", "chosen", "rejected"}: strings, or message lists (conversational:
                     the prompt's turns, then one assistant turn each)
- ranking            {"prompt": str, "responses": [best, ..., worst]} with K >= 2 distinct responses
- hh                 {"chosen": transcript, "rejected": transcript}: Anthropic HH-RLHF, where
                     each transcript is "\\n\\nHuman: ... \\n\\nAssistant: ...". The prompt is
                     everything up to and including the last "\\n\\nAssistant:" and must be the
                     same in both.
- implicit           {"chosen", "rejected"} without a prompt: the prompt is their common beginning
                     (characters of strings, whole messages of message lists), as TRL takes it.
                     `auto` reads string transcripts with an "\\n\\nAssistant:" turn as hh.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import FusedRLError

HH_ASSISTANT = "\n\nAssistant:"


class DataError(FusedRLError, ValueError):
    """A malformed data row: the message starts with `file:line:` (or `file: row N:`)."""


def located(where: str, fn, *args):
    """fn(*args); its ValueError as a DataError naming the row (`where`)."""
    try:
        return fn(*args)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None


@dataclass(frozen=True)
class Demonstration:
    """One SFT example. `messages` is set for chat rows (then prompt/response are rendered
    later)."""

    prompt: str
    response: str
    messages: tuple | None = None  # ((role, content), ...); (role, content, extras) see parse_turns
    # With messages: the assistant turns from this index on are trained; None: the last turn only,
    # rendered as prompt + response.
    train_from: int | None = None
    tools: str | None = None  # the row's `tools` column (JSON schemas for the template), as JSON


@dataclass(frozen=True)
class Ranking:
    """One preference example: responses ordered best first (pairwise is K = 2). With `messages`
    (conversational) the prompt is those turns and each response one assistant turn, rendered
    later."""

    prompt: str
    responses: tuple[str, ...]
    messages: tuple | None = None


def _string(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


# The message keys kept besides role and content: an assistant's tool calls, a tool answer's name /
# id.
EXTRA_KEYS = ("tool_calls", "name", "tool_call_id")


def parse_turns(value, key: str) -> tuple:
    """A message list [{"role": str, "content": str}, ...] -> ((role, content), ...); a message with
    tool_calls (an assistant's; its content may then be missing or null), name or tool_call_id is
    (role, content, extras) instead, extras those keys as a JSON object (hashable, as records
    are)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"field {key!r} must be a non-empty list of {{role, content}} messages")
    turns = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise ValueError(f"{key}[{i}] must be an object with string role and content")
        # Columnar sources (parquet, datasets) fill keys a message lacks with null.
        extras = {k: m[k] for k in EXTRA_KEYS if m.get(k) is not None}
        if "tool_calls" in extras:
            _check_tool_calls(m["role"], extras["tool_calls"], f"{key}[{i}]")
        content = "" if "tool_calls" in extras and m.get("content") is None else m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"{key}[{i}] must be an object with string role and content")
        turns.append((m["role"], content, json.dumps(extras)) if extras else (m["role"], content))
    return tuple(turns)


def _check_tool_calls(role: str, calls, where: str) -> None:
    if role != "assistant":
        raise ValueError(
            f"{where} has tool_calls but role {role!r}: only assistant messages call tools")
    for j, call in enumerate(calls if isinstance(calls, list) else [None]):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments", {}), (dict, str))):
            raise ValueError(f"{where}.tool_calls[{j}] is {str(call)[:120]!r}: expected "
                             '{"type": "function", "function": {"name": str, "arguments": object}}')


def tools_column(row: dict) -> str | None:
    """The row's `tools` (a list of JSON schemas, or null) as JSON, for the chat template."""
    tools = row.get("tools")
    if tools is None:
        return None
    if not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError(
            f"field 'tools' must be a list of JSON schema objects, got {str(tools)[:120]!r}")
    return json.dumps(tools)


def _ends_with_assistant(turns: tuple, what: str) -> None:
    if turns[-1][0] != "assistant" or not (turns[-1][1] or len(turns[-1]) == 3):
        raise ValueError(f"the last message of {what} must be a non-empty assistant turn")


def _chat(row: dict, all_turns: bool) -> Demonstration:
    turns = parse_turns(row["messages"], "messages")
    if len(turns) < 2:
        raise ValueError("messages must be a list of at least two {role, content} turns")
    _ends_with_assistant(turns, "messages (it is the response)")
    return Demonstration("", turns[-1][1], turns, 0 if all_turns else None, tools_column(row))


def _prompt_completion(row: dict) -> Demonstration:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise ValueError("prompt and completion must both be strings or both be message lists, "
                             f"got {type(prompt).__name__} and {type(completion).__name__}")
        prompt_turns = parse_turns(prompt, "prompt")
        completion_turns = parse_turns(completion, "completion")
        _ends_with_assistant(completion_turns, "completion")
        turns = prompt_turns + completion_turns
        return Demonstration("", turns[-1][1], turns, len(prompt_turns), tools_column(row))
    completion = _string(row, "completion")
    if not completion:
        raise ValueError("empty completion")
    return Demonstration(_string(row, "prompt"), completion)


def _prompt_response(row: dict) -> Demonstration:
    response = _string(row, "response")
    if not response:
        raise ValueError("empty response")
    return Demonstration(_string(row, "prompt"), response)


def _text(row: dict) -> Demonstration:
    text = _string(row, "text")
    if not text:
        raise ValueError("empty text")
    return Demonstration("", text)


def _ranking(row: dict) -> Ranking:
    responses = row["responses"]
    if (not isinstance(responses, list) or len(responses) < 2
            or not all(isinstance(r, str) for r in responses)):
        raise ValueError("responses must be a list of at least two strings, best first")
    if len(set(responses)) != len(responses):
        raise ValueError("responses must be distinct (a tie cannot be ranked)")
    return Ranking(_string(row, "prompt"), tuple(responses))


def _pairwise(row: dict) -> Ranking:
    if isinstance(row["chosen"], list) or isinstance(row["prompt"], list):
        return _conversational(parse_turns(row["prompt"], "prompt"), row["chosen"], row["rejected"])
    chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical")
    return Ranking(_string(row, "prompt"), (chosen, rejected))


def _conversational(prompt: tuple, chosen, rejected) -> Ranking:
    """Prompt turns and the chosen / rejected message lists, each one assistant turn."""
    pair = []
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        turns = parse_turns(value, key)
        if len(turns) != 1:
            raise ValueError(f"{key} must be one assistant message after the prompt, got "
                             f"{len(turns)} messages")
        _ends_with_assistant(turns, key)
        pair.append(turns[0][1])
    if pair[0] == pair[1]:
        raise ValueError("chosen and rejected are identical")
    return Ranking("", tuple(pair), prompt)


def _implicit(row: dict) -> Ranking:
    """chosen/rejected without a prompt: their common beginning is the prompt (TRL's
    extract_prompt)."""
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list):
        c, r = parse_turns(chosen, "chosen"), parse_turns(rejected, "rejected")
        shared = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
        if shared == 0:
            raise ValueError("chosen and rejected share no first message: an implicit prompt is "
                             "their common beginning (or give a prompt column)")
        return _conversational(c[:shared], as_messages(c[shared:]), as_messages(r[shared:]))
    chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical")
    cut = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
               min(len(chosen), len(rejected)))
    if cut > 0 and chosen[cut - 1] == " ":  # the responses keep their leading space, as TRL's
        cut -= 1
    if cut == 0 or cut in (len(chosen), len(rejected)):
        raise ValueError("chosen and rejected must share a beginning (the implicit prompt) and "
                         "differ after it (or give a prompt column)")
    return Ranking(chosen[:cut], (chosen[cut:], rejected[cut:]))


def as_messages(turns) -> list[dict]:
    """((role, content[, extras]), ...) -> [{"role", "content", ...extras}, ...] (what chat
    templates read)."""
    return [{"role": t[0], "content": t[1], **(json.loads(t[2]) if len(t) == 3 else {})}
            for t in turns]


def _hh_row(row: dict) -> Ranking:
    return parse_hh(_string(row, "chosen"), _string(row, "rejected"))


def parse_hh(chosen: str, rejected: str) -> Ranking:
    """Split two HH-RLHF transcripts into their shared prompt and the two final assistant turns."""
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"chosen transcript has no {HH_ASSISTANT!r} turn")
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt) or HH_ASSISTANT in rejected[len(prompt):]:
        raise ValueError(
            "chosen and rejected transcripts do not share the dialogue before the last "
            "assistant turn")
    pair = (chosen[len(prompt):], rejected[len(prompt):])
    if pair[0] == pair[1]:
        raise ValueError("chosen and rejected final turns are identical")
    return Ranking(prompt, pair)


def _chosen_rejected(row: dict) -> Ranking:
    """auto without a prompt: HH transcripts, else an implicit prompt."""
    chosen = row["chosen"]
    return _hh_row(row) if isinstance(chosen, str) and HH_ASSISTANT in chosen else _implicit(row)


# format -> (the keys it needs, its row parser); `auto` tries a stage's formats in order, rows of
# chosen+rejected without a prompt last (HH transcripts or an implicit prompt).
_FORMATS = {
    "chat": ({"messages"}, _chat),
    "prompt_completion": ({"prompt", "completion"}, _prompt_completion),
    "demonstration": ({"prompt", "response"}, _prompt_response),
    "text": ({"text"}, _text),
    "ranking": ({"prompt", "responses"}, _ranking),
    "pairwise": ({"prompt", "chosen", "rejected"}, _pairwise),
    "hh": ({"chosen", "rejected"}, _hh_row),
    "implicit": ({"chosen", "rejected"}, _implicit),
    "chosen+rejected": ({"chosen", "rejected"}, _chosen_rejected),
}
_AUTO = {"sft": ["chat", "prompt_completion", "demonstration", "text"],
         "rm": ["ranking", "pairwise", "chosen+rejected"]}
_EXPECTED = {"sft": "messages, prompt+completion, prompt+response or text",
             "rm": "prompt+chosen+rejected, prompt+responses or chosen+rejected (implicit prompt "
                   "or HH transcripts)"}


def parser_for(stage: str, fmt: str, all_turns: bool = True):
    """The row parser for `stage` ("sft" or "rm") and data format (see DataConfig.format);
    all_turns: chat rows train every assistant turn (else the last only,
    data.train_on=last_turn)."""
    candidates = [_FORMATS[name] for name in (_AUTO[stage] if fmt == "auto" else [fmt])]

    def parse(row: dict):
        for keys, parse_row in candidates:
            if keys <= set(row):
                return _chat(row, all_turns) if parse_row is _chat else parse_row(row)
        if fmt == "auto":
            raise ValueError(f"expected keys {_EXPECTED[stage]}, got {sorted(row)}")
        raise ValueError(f"format {fmt!r} needs keys {sorted(candidates[0][0])}, got {sorted(row)}")
    return parse


def numbered_lines(path, max_line_bytes: int | None = None):
    """(line number, raw bytes) of each non-blank line of `path`. Decoding is left to decode_line,
    per line, so that bytes which are not UTF-8 become an error with a line number. With
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
        raise ValueError(
            f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
