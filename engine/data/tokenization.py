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


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


_CHARS_PER_TOKEN = weakref.WeakKeyDictionary()


def text_budget(tokenizer, tokens: int) -> int:
    """Characters of text that surely hold more than `tokens` tokens: 2 * tokens * the longest
    token."""
    if tokenizer not in _CHARS_PER_TOKEN:
        _CHARS_PER_TOKEN[tokenizer] = max(map(len, tokenizer.get_vocab()), default=1)
    return 2 * max(tokens, 1) * _CHARS_PER_TOKEN[tokenizer]


def tokenize_prompt(tokenizer, prompt: str, max_prompt_length: int) -> list[int]:
    """The prompt's last max_prompt_length tokens (rule 2)."""
    budget = text_budget(tokenizer, max_prompt_length)
    return _encode(tokenizer, prompt[-budget:], special=True)[-max_prompt_length:]


def tokenize_response(tokenizer, response: str, room: int) -> list[int]:
    """The response's first `room` tokens, EOS included when it fits (rules 1 and 3)."""
    ids = _encode(tokenizer, response[:text_budget(tokenizer, room)], special=False)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids[:room]


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


def tokenize_record(tokenizer, record, max_length: int,
                    max_prompt_length: int) -> TokenizedExample | None:
    """A Demonstration or Ranking -> TokenizedExample, or None when a response has no room left
    (an empty prompt and response together, which cannot happen when P < L)."""
    if isinstance(record, Demonstration) and record.train_from is not None:
        pieces = conversation_pieces(tokenizer, record.messages, record.train_from, record.tools)
        return tokenize_conversation(tokenizer, pieces, max_length, max_prompt_length)
    if isinstance(record, Demonstration):
        prompt, responses = (render_chat(tokenizer, record.messages, record.tools)
                             if record.messages
                             else (record.prompt, record.response))
        responses = (responses,)
    elif isinstance(record, Ranking) and record.messages:
        rendered = [render_chat(tokenizer, record.messages + (("assistant", response),))
                    for response in record.responses]
        prompt, responses = rendered[0][0], tuple(response for _, response in rendered)
    elif isinstance(record, Ranking):
        prompt, responses = record.prompt, record.responses
    else:
        raise TypeError(f"cannot tokenize a {type(record).__name__}")
    prompt_ids = tokenize_prompt(tokenizer, prompt, max_prompt_length)
    room = max_length - len(prompt_ids)
    response_ids = tuple(tokenize_response(tokenizer, r, room) for r in responses)
    if any(not r for r in response_ids):
        return None
    return TokenizedExample(prompt_ids, response_ids)
