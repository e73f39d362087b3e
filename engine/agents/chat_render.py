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

One renderer serves every environment thread of a rollout. A fast tokenizer keeps "split special
tokens" as a flag on its Rust object, set by each encode call before it reads the text
(transformers' TokenizersBackend): two threads encoding at once, one a content and one the
template's text, would each read with the other's flag, the template's `<|im_start|>` spelled out
character by character or, worse, an observation's end-of-turn string read as the template's own
token (an injected turn). So the renderer encodes with a tokenizer of its own (a copy: no other
user of the caller's tokenizer can flip the flag under it), one encode at a time, each naming the
flag it needs.
"""
from __future__ import annotations

import copy
import re
import threading

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
        self.tokenizer, self.tools = copy.deepcopy(tokenizer), tools or None
        self._encoding = threading.Lock()
        self._base_text = self._render(_BASE, generation=False)
        answer_end = self._base_text.rfind(_BASE[-1]["content"]) + len(_BASE[-1]["content"])
        closing = self._encode_text(self._base_text[answer_end:], split_special_tokens=False)
        if not closing:
            raise UsageError(
                "the chat template writes nothing after an assistant message: no end-of-turn "
                "token to stop a turn at")
        self.end_of_turn_id = closing[0]
        self._after_turn = self.tokenizer.decode(closing[1:])

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
                ids += self._encode_text(piece, split_special_tokens=False)
            else:
                ids += self._encode_text(contents[int(piece)], split_special_tokens=True)
        return ids

    def _encode_text(self, text: str, split_special_tokens: bool) -> list[int]:
        """text -> ids, its special-token strings read as the tokens (the template's text) or
        split into their characters (a message's content); one encode at a time (the module's
        docstring says why)."""
        if not text:
            return []
        with self._encoding:
            return self.tokenizer.encode(text, add_special_tokens=False,
                                         split_special_tokens=split_special_tokens)

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
