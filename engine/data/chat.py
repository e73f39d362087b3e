"""Conversations to text: the one place a chat is rendered (SFT, reward model, RL prompts).

With a chat template (the tokenizer's) a prompt is the template applied to the turns with the
generation prompt, exactly what a chat model sees before it answers; without one, turns are written
"\\n\\nRole: content" in the HH style and the prompt ends with "\\n\\nAssistant:".

Training every assistant turn (`conversation_pieces`) cuts the rendered conversation into context
and target pieces: before each trained assistant turn, the template's prompt for the turns so far;
the turn itself up to the end of its content (what the template writes before the content, e.g. an
empty think block, included). The template's end-of-turn text goes on as context, except its
leading EOS token text: the tokenizer's EOS id ends each target instead (data/tokenization.py), so
the model learns to stop there as with a single response. An assistant turn with tool calls (the
template writes them, e.g. Hermes `<tool_call>` blocks, after any content) is the target up to
where the template's end-of-turn text begins; `tool` messages are context, like user turns.
`tools`: the row's tool schemas as JSON (records.tools_column), given to the template.
"""
from __future__ import annotations

import json

from .records import HH_ASSISTANT, DataError, as_messages
from .time_limit import TimeLimitExceeded, time_limit

# The longest a chat template may take to render one conversation (real ones take milliseconds).
TEMPLATE_SECONDS = 10.0


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _template(tokenizer, turns, generation_prompt: bool, tools: str | None = None) -> str:
    """The chat template applied, within TEMPLATE_SECONDS; a DataError (the row's error) when the
    template refuses the turns (e.g. roles that do not alternate, which some templates raise on)
    or runs longer."""
    import jinja2  # transformers' template engine, loaded with it

    try:
        with time_limit(TEMPLATE_SECONDS):
            return tokenizer.apply_chat_template(as_messages(turns),
                                                 tools=json.loads(tools) if tools else None,
                                                 tokenize=False,
                                                 add_generation_prompt=generation_prompt)
    except jinja2.TemplateError as e:
        raise DataError(f"the tokenizer's chat template refused these messages: {e}") from None
    except TimeLimitExceeded as e:
        raise DataError(f"the tokenizer's chat template {e} to render {len(turns)} turns: a "
                        "template that loops without end? fix chat_template in the model's "
                        "tokenizer files") from None


def render_prompt(tokenizer, turns, tools: str | None = None) -> str:
    """(role, content) turns -> the text after which the assistant answers (template with the
    generation prompt, or HH style)."""
    if has_template(tokenizer):
        return _template(tokenizer, turns, generation_prompt=True, tools=tools)
    return _hh(turns) + HH_ASSISTANT


def _render(tokenizer, turns, tools: str | None = None) -> str:
    """The whole conversation as text, without a generation prompt."""
    if has_template(tokenizer):
        return _template(tokenizer, turns, generation_prompt=False, tools=tools)
    _refuse_extras(turns)
    if turns[-1][0] != "assistant":
        return _hh(turns)
    return _hh(turns[:-1]) + HH_ASSISTANT + " " + turns[-1][1]


def _hh(turns) -> str:
    _refuse_extras(turns)
    return "".join(f"\n\n{role.capitalize()}: {content}" for role, content in turns)


def _refuse_extras(turns) -> None:
    if any(len(t) == 3 for t in turns):
        raise DataError(
            "messages with tool_calls, name or tool_call_id need a chat template to render "
            "them; the tokenizer has none")


def _turn_end(tokenizer, turn, prompt: str, full: str) -> int:
    """Where the assistant `turn`, rendered last in `full` after `prompt`, ends: after its content,
    or for a turn with tool calls where the template's end-of-turn text begins; -1 when `full`
    does not start with `prompt` (or the template writes no such end)."""
    if not full.startswith(prompt):
        return -1
    if len(turn) == 2:
        end = full.find(turn[1], len(prompt))
        return end + len(turn[1]) if end >= 0 else -1
    answer = "fusedrl closing probe"
    probe = _render(tokenizer, (("user", "q"), ("assistant", answer)))
    closing = probe[probe.rfind(answer) + len(answer):]
    return len(full) - len(closing) if closing and full.endswith(closing) else -1


def render_chat(tokenizer, turns, tools: str | None = None) -> tuple[str, str]:
    """Turns ending in the assistant's -> (prompt text, response text): the prompt of all turns but
    the last (render_prompt), the response the last turn's content (HH style: after a space), or
    with tool calls its text as the template writes it (_turn_end)."""
    prompt = render_prompt(tokenizer, turns[:-1], tools)
    if len(turns[-1]) == 3:
        full = _render(tokenizer, turns, tools)
        end = _turn_end(tokenizer, turns[-1], prompt, full)
        if end < 0:
            raise DataError(
                "the chat template renders the turns before the last one differently once "
                "it follows, or writes no end-of-turn text after a tool call")
        return prompt, full[len(prompt):end]
    return prompt, turns[-1][1] if has_template(tokenizer) else " " + turns[-1][1]


def conversation_pieces(tokenizer, turns, train_from: int,
                        tools: str | None = None) -> list[tuple[str, bool]]:
    """(text, is_target) pieces of a conversation, context first, in which the assistant turns at
    index >= train_from are the targets (see the module docstring). ValueError when the template
    renders an earlier turn differently once later turns follow (then only the last turn can be
    trained: data.train_on=last_turn)."""
    eos = getattr(tokenizer, "eos_token", None) or ""
    pieces, done = [], ""  # done: the rendered text the pieces cover so far
    for i, turn in enumerate(turns):
        if turn[0] != "assistant" or i < train_from:
            continue
        prompt, full = render_prompt(tokenizer, turns[:i], tools), _render(tokenizer, turns[:i + 1],
                                                                           tools)
        end = _turn_end(tokenizer, turn, prompt, full)
        if not prompt.startswith(done) or end < 0:
            raise ValueError(f"the chat template renders the turns before message {i} differently "
                             "once it follows (e.g. it drops earlier reasoning): every assistant "
                             "turn cannot be trained in one sequence; set data.train_on=last_turn")
        pieces += [(prompt[len(done):], False), (full[len(prompt):end], True)]
        done = full[:end] + (eos if eos and full.startswith(eos, end) else "")
    return pieces
