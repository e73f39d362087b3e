"""Text records -> token ids, with the truncation rules of both stages.

Rules (max_length L, max_prompt_length P < L):
1. The prompt is tokenized with the tokenizer's special tokens (e.g. BOS); the response without,
   followed by EOS (when the tokenizer has one), since the model must learn to stop.
2. A prompt longer than P keeps its last P tokens: the end of a prompt is what the response answers.
3. The response is cut at the end so that prompt + response <= L (the EOS is then lost too).
Prompt and response are tokenized separately, so ids at their boundary may differ from tokenizing
the joined text; training and reward scoring use the same split, so they agree with each other.
4. A conversation that trains several assistant turns (data/chat.py's pieces) is the prompt (its
   first context, rule 2) and one response of every later piece, each tokenized on its own, a
   target turn followed by EOS; a mask marks the target tokens, and the whole is cut at the end
   (rule 3); a conversation left without a target token is dropped.
Memory is bounded by the tokens kept, not by the line: a text longer than twice the kept tokens
times the vocabulary's longest token (in characters, an upper bound on what one token covers) is
cut to that many characters first (from the side that is dropped anyway), so a 30 MB line costs no
more than a short one. The kept tokens are the same, except inside one unbroken "word" longer than
the cut, whose BPE merges may align differently.

A data set's texts go to the tokenizer in batches (`tokenize_records`: its prompts, then its
responses, TEXTS_PER_CALL a call), not one call per text: a call of a Hugging Face tokenizer costs
~40 us of Python whatever its text, and a fast tokenizer encodes a batch in its Rust core on every
core. The ids are those of one call per text (the same encoder on the same strings); the demo's
8,000 rankings (24,000 short texts) took 0.9 s one text a call and 0.3 s in one batch.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

from .chat import conversation_pieces, render_chat
from .records import Demonstration, Ranking


@dataclass(frozen=True)
class TokenizedExample:
    """Prompt ids and one or more response ids (SFT: one; RM: K, best first). `masks`: per response,
    which of its tokens are trained (a conversation's assistant turns); None: all of them.
    `images`: the prompt's images (data/vision_processor.py's ImageInputs) whose tokens the prompt
    holds expanded, None for text."""

    prompt: list[int]
    responses: tuple[list[int], ...]
    masks: tuple[tuple[bool, ...], ...] | None = None
    images: object = None

    @property
    def num_tokens(self) -> int:
        return len(self.responses) * len(self.prompt) + sum(len(r) for r in self.responses)


# Texts per call of the tokenizer: a call's Python cost spread over many, its encodings (the ids,
# and the attention masks we drop) held for a few thousand texts at a time, not a data set's.
TEXTS_PER_CALL = 4096


def _encode_all(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    """Each text's ids (an empty text: none, not even a special token), from one call of the
    tokenizer per TEXTS_PER_CALL of them."""
    out: list[list[int]] = [[] for _ in texts]
    given = [i for i, text in enumerate(texts) if text]
    for start in range(0, len(given), TEXTS_PER_CALL):
        chunk = given[start:start + TEXTS_PER_CALL]
        ids = tokenizer([texts[i] for i in chunk], add_special_tokens=special)["input_ids"]
        for i, row in zip(chunk, ids):
            out[i] = list(row)
    return out


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return _encode_all(tokenizer, [text], special)[0]


_CHARS_PER_TOKEN = weakref.WeakKeyDictionary()


def text_budget(tokenizer, tokens: int) -> int:
    """Characters of text that surely hold more than `tokens` tokens: 2 * tokens * the longest
    token."""
    if tokenizer not in _CHARS_PER_TOKEN:
        _CHARS_PER_TOKEN[tokenizer] = max(map(len, tokenizer.get_vocab()), default=1)
    return 2 * max(tokens, 1) * _CHARS_PER_TOKEN[tokenizer]


def tokenize_prompts(tokenizer, prompts: list[str], max_prompt_length: int) -> list[list[int]]:
    """Each prompt's last max_prompt_length tokens (rule 2), in one call of the tokenizer."""
    if not prompts:
        return []
    budget = text_budget(tokenizer, max_prompt_length)
    return [ids[-max_prompt_length:]
            for ids in _encode_all(tokenizer, [p[-budget:] for p in prompts], special=True)]


def tokenize_prompt(tokenizer, prompt: str, max_prompt_length: int) -> list[int]:
    """The prompt's last max_prompt_length tokens (rule 2)."""
    return tokenize_prompts(tokenizer, [prompt], max_prompt_length)[0]


def tokenize_responses(tokenizer, responses: list[tuple[str, int]]) -> list[list[int]]:
    """Each (response, room) as its first `room` tokens, EOS included when it fits (rules 1 and
    3), in one call of the tokenizer."""
    encoded = _encode_all(tokenizer, [text[:text_budget(tokenizer, room)]
                                      for text, room in responses], special=False)
    eos = tokenizer.eos_token_id
    return [(ids + [eos] if eos is not None else ids)[:room]
            for ids, (_, room) in zip(encoded, responses)]


def tokenize_response(tokenizer, response: str, room: int) -> list[int]:
    """The response's first `room` tokens, EOS included when it fits (rules 1 and 3)."""
    return tokenize_responses(tokenizer, [(response, room)])[0]


def tokenize_conversation(tokenizer, pieces: list[tuple[str, bool]], max_length: int,
                          max_prompt_length: int) -> TokenizedExample | None:
    """Rule 4: data/chat.py's (text, is_target) pieces -> the prompt, one response and its mask;
    None when no target token is left within max_length."""
    prompt_ids = tokenize_prompt(tokenizer, pieces[0][0], max_prompt_length)
    room = max_length - len(prompt_ids)
    ids, mask = [], []
    for text, is_target in pieces[1:]:
        if len(ids) >= room:
            break
        left = room - len(ids)
        piece = (tokenize_response(tokenizer, text, left) if is_target
                 else _encode(tokenizer, text[:text_budget(tokenizer, left)], special=False))
        ids += piece
        mask += [is_target] * len(piece)
    ids, mask = ids[:room], mask[:room]
    return TokenizedExample(prompt_ids, (ids,), (tuple(mask),)) if any(mask) else None


def record_texts(tokenizer, record) -> tuple[str, tuple[str, ...]]:
    """A Demonstration or Ranking (not a conversation trained on several turns) -> its prompt and
    response texts, rendered through the chat template where it holds messages."""
    if isinstance(record, Demonstration):
        if record.messages:
            prompt, response = render_chat(tokenizer, record.messages, record.tools)
            return prompt, (response,)
        return record.prompt, (record.response,)
    if isinstance(record, Ranking) and record.messages:
        rendered = [render_chat(tokenizer, record.messages + (("assistant", response),))
                    for response in record.responses]
        return rendered[0][0], tuple(response for _, response in rendered)
    if isinstance(record, Ranking):
        return record.prompt, record.responses
    raise TypeError(f"cannot tokenize a {type(record).__name__}")


def tokenize_records(tokenizer, records: list, max_length: int,
                     max_prompt_length: int) -> list[TokenizedExample | None]:
    """Each Demonstration or Ranking -> TokenizedExample, or None when a response has no room left
    (an empty prompt and response together, which cannot happen when P < L). The prompts go to the
    tokenizer in one call, then the responses in one (a conversation trained on several turns:
    its pieces one by one, rule 4)."""
    out: list[TokenizedExample | None] = [None] * len(records)
    plain = []  # (index, prompt, responses)
    for i, record in enumerate(records):
        if isinstance(record, Demonstration) and record.train_from is not None:
            pieces = conversation_pieces(tokenizer, record.messages, record.train_from,
                                         record.tools)
            out[i] = tokenize_conversation(tokenizer, pieces, max_length, max_prompt_length)
        else:
            plain.append((i, *record_texts(tokenizer, record)))
    prompt_ids = tokenize_prompts(tokenizer, [prompt for _, prompt, _ in plain], max_prompt_length)
    responses = iter(tokenize_responses(tokenizer, [
        (text, max_length - len(ids)) for ids, (_, _, texts) in zip(prompt_ids, plain)
        for text in texts]))
    for ids, (i, _, texts) in zip(prompt_ids, plain):
        response_ids = tuple(next(responses) for _ in texts)
        if all(response_ids):
            out[i] = TokenizedExample(ids, response_ids)
    return out


def tokenize_record(tokenizer, record, max_length: int,
                    max_prompt_length: int) -> TokenizedExample | None:
    """A Demonstration or Ranking -> TokenizedExample, or None (tokenize_records)."""
    return tokenize_records(tokenizer, [record], max_length, max_prompt_length)[0]
