"""Token in, token out: a conversation's tokens are rendered by the chat template once, as the
model will see them, and every later message is rendered as a suffix appended to them; nothing
the model saw (or said) is ever re-tokenized from text.

The suffix of new messages is what the template writes for them after a fixed two-message
conversation (`base`), with the generation prompt: render(base + new) minus render(base). The
model's own turn stops at the template's end-of-turn token (`end_of_turn_id`, a stop token of
the rollout); what the template writes after that token (Qwen's newline after <|im_end|>) opens
the suffix, since the model never sampled it.

Message contents are text, whatever they hold: each is tokenized on its own with the tokenizer's
special tokens split (`split_special_tokens`), so a tool output or observation that writes the
template's end-of-turn or turn-start strings gives their characters' ids, never the template's
own; only the template's text around the contents can hold special tokens. (Added tokens that are
not special, such as Qwen's `<tool_call>`, stay whole: they open no turn.)
"""
from __future__ import annotations

import re

from ..errors import UsageError

_BASE = [{"role": "user", "content": "fusedrl base question"},
         {"role": "assistant", "content": "fusedrl base answer"}]
# Stand-ins for message contents in the rendered text (private-use characters: no template writes
# them), so the template's own text and the contents can be tokenized apart.
_MARK = re.compile("\ue000([0-9]+)\ue001")


class ChatRenderer:
    """Renders a conversation's opening and the suffix of each later group of messages to ids."""

    def __init__(self, tokenizer, tools: list[dict] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("multi-turn rollouts need a tokenizer with a chat template")
        self.tokenizer, self.tools = tokenizer, tools or None
        self._base_text = self._render(_BASE, generation=False)
        answer_end = self._base_text.rfind(_BASE[-1]["content"]) + len(_BASE[-1]["content"])
        closing = tokenizer.encode(self._base_text[answer_end:], add_special_tokens=False)
        if not closing:
            raise UsageError(
                "the chat template writes nothing after an assistant message: no end-of-turn "
                "token to stop a turn at")
        self.end_of_turn_id = closing[0]
        self._after_turn = tokenizer.decode(closing[1:])

    def opening(self, messages: list[dict]) -> list[int]:
        """The conversation so far, with the generation prompt, as the model's prompt ids."""
        marked, contents = _marked(messages)
        return self._encode(self._render(marked, generation=True), contents,
                            lambda: self._render(messages, generation=True))

    def continuation(self, messages: list[dict]) -> list[int]:
        """The ids that follow the model's end-of-turn token: `messages` and the generation
        prompt."""
        marked, contents = _marked(messages)
        text = self._render(_BASE + marked, generation=True)
        if not text.startswith(self._base_text):
            raise UsageError(
                "the chat template renders earlier messages differently once more follow; "
                "its suffixes cannot be appended token for token")
        return self._encode(
            self._after_turn + text[len(self._base_text):], contents,
            lambda: self._after_turn + self._render(_BASE + list(messages),
                                                    generation=True)[len(self._base_text):])

    def _encode(self, marked: str, contents: list[str], plain) -> list[int]:
        """The ids of `marked` (rendered text with content stand-ins): the template's pieces as
        the tokenizer reads them, each content with its special tokens split. `plain()`: the text
        rendered with the contents themselves, which the pieces must make up."""
        pieces = _MARK.split(marked)  # template, index, template, index, ..., template
        if "".join(p if i % 2 == 0 else contents[int(p)]
                   for i, p in enumerate(pieces)) != plain():
            raise UsageError(
                "the chat template changes message contents as it renders them (or writes one "
                "twice); their special-token strings cannot be kept apart from its own")
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                ids += self.tokenizer.encode(piece, add_special_tokens=False) if piece else []
            elif contents[int(piece)]:
                ids += self.tokenizer.encode(contents[int(piece)], add_special_tokens=False,
                                             split_special_tokens=True)
        return ids

    def turn_text(self, token_ids: list[int]) -> str:
        """An assistant turn's text, as an environment reads it (special tokens dropped)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _render(self, messages: list[dict], generation: bool) -> str:
        """The template's text of `messages` (jinja2's TemplateError where it refuses one)."""
        return self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                                  add_generation_prompt=generation)


def _marked(messages: list[dict]) -> tuple[list[dict], list[str]]:
    """`messages` with each string content replaced by its stand-in, and the contents in order."""
    marked, contents = [], []
    for m in messages:
        if isinstance(m.get("content"), str):
            m = {**m, "content": f"\ue000{len(contents)}\ue001"}
            contents.append(messages[len(marked)]["content"])
        marked.append(m)
    return marked, contents
