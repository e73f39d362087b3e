"""Conversations to text: the one place a chat is rendered (SFT, reward model, RL prompts).

With a chat template (the tokenizer's) a prompt is the template applied to the turns with the
generation prompt, exactly what a chat model sees before it answers; without one, turns are written
"\\n\\nRole: content" in the HH style and the prompt ends with "\\n\\nAssistant:".

Training every assistant turn (`conversation_pieces`) cuts the rendered conversation into context
and target pieces: before each trained assistant turn, the template's prompt for the turns so far;
the turn itself up to the end of its content (what the template writes before the content, e.g. an
empty think block, included). The template's end-of-turn text goes on as context, except its
leading EOS token text: the tokenizer's EOS id ends each target instead (data/tokenization.py), so
the model learns to stop there as with a single response.
"""
from __future__ import annotations

from .records import HH_ASSISTANT, DataError, as_messages
from .time_limit import TimeLimitExceeded, time_limit

# The longest a chat template may take to render one conversation (real ones take milliseconds).
TEMPLATE_SECONDS = 10.0


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _template(tokenizer, turns, generation_prompt: bool) -> str:
    """The chat template applied, within TEMPLATE_SECONDS; a DataError (the row's error) when the
    template refuses the turns (e.g. roles that do not alternate, which some templates raise on)
    or runs longer."""
    import jinja2  # transformers' template engine, loaded with it

    try:
        with time_limit(TEMPLATE_SECONDS):
            return tokenizer.apply_chat_template(as_messages(turns), tokenize=False,
                                                 add_generation_prompt=generation_prompt)
    except jinja2.TemplateError as e:
        raise DataError(f"the tokenizer's chat template refused these messages: {e}") from None
    except TimeLimitExceeded as e:
        raise DataError(f"the tokenizer's chat template {e} to render {len(turns)} turns: a "
                        "template that loops without end? fix chat_template in the model's "
                        "tokenizer files") from None


def render_prompt(tokenizer, turns) -> str:
    """(role, content) turns -> the text after which the assistant answers (template with the
    generation prompt, or HH style)."""
    if has_template(tokenizer):
        return _template(tokenizer, turns, generation_prompt=True)
    return _hh(turns) + HH_ASSISTANT


def _render(tokenizer, turns) -> str:
    """The whole conversation as text, without a generation prompt."""
    if has_template(tokenizer):
        return _template(tokenizer, turns, generation_prompt=False)
    if turns[-1][0] != "assistant":
        return _hh(turns)
    return _hh(turns[:-1]) + HH_ASSISTANT + " " + turns[-1][1]


def _hh(turns) -> str:
    return "".join(f"\n\n{role.capitalize()}: {content}" for role, content in turns)


def render_chat(tokenizer, turns) -> tuple[str, str]:
    """Turns ending in the assistant's -> (prompt text, response text): the prompt of all turns but
    the last (render_prompt), the response the last turn's content (HH style: after a space)."""
    prompt = render_prompt(tokenizer, turns[:-1])
    return prompt, turns[-1][1] if has_template(tokenizer) else " " + turns[-1][1]


def conversation_pieces(tokenizer, turns, train_from: int) -> list[tuple[str, bool]]:
    """(text, is_target) pieces of a conversation, context first, in which the assistant turns at
    index >= train_from are the targets (see the module docstring). ValueError when the template
    renders an earlier turn differently once later turns follow (then only the last turn can be
    trained: data.train_on=last_turn)."""
    eos = getattr(tokenizer, "eos_token", None) or ""
    pieces, done = [], ""  # done: the rendered text the pieces cover so far
    for i, (role, content) in enumerate(turns):
        if role != "assistant" or i < train_from:
            continue
        prompt, full = render_prompt(tokenizer, turns[:i]), _render(tokenizer, turns[:i + 1])
        end = full.find(content, len(prompt)) if full.startswith(prompt) else -1
        if not prompt.startswith(done) or end < 0:
            raise ValueError(f"the chat template renders the turns before message {i} differently "
                             "once it follows (e.g. it drops earlier reasoning): every assistant "
                             "turn cannot be trained in one sequence; set data.train_on=last_turn")
        end += len(content)
        pieces += [(prompt[len(done):], False), (full[len(prompt):end], True)]
        done = full[:end] + (eos if eos and full.startswith(eos, end) else "")
    return pieces
