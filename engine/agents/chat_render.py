"""Token in, token out: a conversation's tokens are rendered by the chat template once, as the
model will see them, and every later message is rendered as a suffix appended to them; nothing
the model saw (or said) is ever re-tokenized from text.

The suffix of new messages is what the template writes for them after a fixed two-message
conversation (`base`), with the generation prompt: render(base + new) minus render(base). The
model's own turn stops at the template's end-of-turn token (`end_of_turn_id`, a stop token of
the rollout); what the template writes after that token (Qwen's newline after <|im_end|>) opens
the suffix, since the model never sampled it.
"""
from __future__ import annotations

from ..errors import UsageError

_BASE = [{"role": "user", "content": "fusedrl base question"},
         {"role": "assistant", "content": "fusedrl base answer"}]


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
        return self.tokenizer.encode(self._render(messages, generation=True),
                                     add_special_tokens=False)

    def continuation(self, messages: list[dict]) -> list[int]:
        """The ids that follow the model's end-of-turn token: `messages` and the generation
        prompt."""
        text = self._render(_BASE + list(messages), generation=True)
        if not text.startswith(self._base_text):
            raise UsageError(
                "the chat template renders earlier messages differently once more follow; "
                "its suffixes cannot be appended token for token")
        return self.tokenizer.encode(self._after_turn + text[len(self._base_text):],
                                     add_special_tokens=False)

    def turn_text(self, token_ids: list[int]) -> str:
        """An assistant turn's text, as an environment reads it (special tokens dropped)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _render(self, messages: list[dict], generation: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                                  add_generation_prompt=generation)
