"""Text records -> token ids, with the truncation rules of both stages.

Rules (max_length L, max_prompt_length P < L):
1. The prompt is tokenized with the tokenizer's special tokens (e.g. BOS); the response without,
   followed by EOS (when the tokenizer has one), since the model must learn to stop.
2. A prompt longer than P keeps its last P tokens: the end of a prompt is what the response answers.
3. The response is cut at the end so that prompt + response <= L (the EOS is then lost too).
Prompt and response are tokenized separately, so ids at their boundary may differ from tokenizing
the joined text; training and reward scoring use the same split, so they agree with each other.
Memory is bounded by the tokens kept, not by the line: a text longer than twice the kept tokens
times the vocabulary's longest token (in characters, an upper bound on what one token covers) is
cut to that many characters first (from the side that is dropped anyway), so a 30 MB line costs no
more than a short one. The kept tokens are the same, except inside one unbroken "word" longer than
the cut, whose BPE merges may align differently.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

from .records import DataError, Demonstration, Ranking
from .time_limit import TimeLimitExceeded, time_limit

# The longest a chat template may take to render one conversation (real ones take milliseconds).
TEMPLATE_SECONDS = 10.0


@dataclass(frozen=True)
class TokenizedExample:
    """Prompt ids and one or more response ids (SFT: one; RM: K, best first)."""

    prompt: list[int]
    responses: tuple[list[int], ...]

    @property
    def num_tokens(self) -> int:
        return len(self.responses) * len(self.prompt) + sum(len(r) for r in self.responses)


def render_chat(tokenizer, turns) -> tuple[str, str]:
    """(role, content) turns ending in the assistant's -> (prompt text, response text).

    With a chat template the prompt is the template applied to all turns but the last, with the
    generation prompt (within TEMPLATE_SECONDS: a DataError when the template runs longer); the
    response is the last turn's content. Without one, turns are written as "\\n\\nRole: content"
    in the HH style.
    """
    history = [{"role": role, "content": content} for role, content in turns[:-1]]
    response = turns[-1][1]
    if getattr(tokenizer, "chat_template", None):
        try:
            with time_limit(TEMPLATE_SECONDS):
                prompt = tokenizer.apply_chat_template(history, tokenize=False,
                                                       add_generation_prompt=True)
        except TimeLimitExceeded as e:
            raise DataError(f"the tokenizer's chat template {e} to render {len(history)} turns: a "
                            "template that loops without end? fix chat_template in the model's "
                            "tokenizer files") from None
        return prompt, response
    prompt = "".join(f"\n\n{role.capitalize()}: {content}" for role, content in turns[:-1])
    return prompt + "\n\nAssistant:", " " + response


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


_CHARS_PER_TOKEN = weakref.WeakKeyDictionary()


def text_budget(tokenizer, tokens: int) -> int:
    """Characters of text that surely hold more than `tokens` tokens: 2 * tokens * the longest token."""
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


def tokenize_record(tokenizer, record, max_length: int, max_prompt_length: int) -> TokenizedExample | None:
    """A Demonstration or Ranking -> TokenizedExample, or None when a response has no room left
    (an empty prompt and response together, which cannot happen when P < L)."""
    if isinstance(record, Demonstration):
        prompt, responses = (render_chat(tokenizer, record.messages) if record.messages
                             else (record.prompt, record.response))
        responses = (responses,)
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
