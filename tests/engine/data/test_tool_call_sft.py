"""SFT on conversations with tool calls (OpenAI/TRL `tool_calls` on assistant messages, `tool`
messages answering them, a `tools` column): rendered by the chat template, the assistant turns
(their tool-call blocks included) trained, the tool answers masked."""
import json

import pytest

from fusedrl.engine.data.chat import render_chat
from fusedrl.engine.data.packing import collate_sft
from fusedrl.engine.data.records import DataError, parser_for
from fusedrl.engine.data.tokenization import tokenize_record
from agent_testing import add, tool_call
from engine_testing import EOS, make_chat_tokenizer, make_tokenizer
from fusedrl.engine.agents import tool_schema

CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
ROW = {"messages": [{"role": "user", "content": "hello"},
                    {"role": "assistant", "tool_calls": [CALL]},
                    {"role": "tool", "name": "add", "content": "5"},
                    {"role": "assistant", "content": "the fox"}]}


@pytest.fixture(scope="module")
def tok():
    return make_chat_tokenizer()


def ids(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


def tokens_and_targets(tok, row, all_turns=True):
    example = tokenize_record(tok, parser_for("sft", "auto", all_turns)(row), 1024, 900)
    batch = collate_sft([example])
    return batch.input_ids.tolist(), batch.target_ids.tolist()


def test_tool_calls_are_trained_and_tool_answers_masked(tok):
    every, trained = tokens_and_targets(tok, ROW)
    call = tool_call("add", a=2, b=3)  # the Hermes block the rollouts' parser reads
    rendered = tok.apply_chat_template(ROW["messages"], tokenize=False)
    assert call in rendered and tok.decode(every) == rendered.rstrip("\n")
    # The call's tokens and the answer, each ended by EOS; not the tool's "5" nor any header.
    assert trained == ids(tok, call) + [EOS] + ids(tok, "the fox") + [EOS]
    # The context before the call's turn, then the call trained: the tokens line up one to one.
    call_ids = ids(tok, call)
    start = next(i for i in range(len(every)) if every[i:i + len(call_ids)] == call_ids)
    assert every[start:start + len(call_ids) + 1] == call_ids + [EOS]


def test_the_tools_column_goes_to_the_template(tok):
    row = {**ROW, "tools": [tool_schema(add)]}
    every, trained = tokens_and_targets(tok, row)
    assert tok.decode(every).startswith("<|r2|>system\nTools: " + json.dumps([tool_schema(add)])[:40])
    assert trained == tokens_and_targets(tok, ROW)[1]  # the schemas are context


def test_a_last_turn_with_tool_calls_is_the_target_of_train_on_last_turn(tok):
    row = {"messages": ROW["messages"][:2]}
    _, trained = tokens_and_targets(tok, row, all_turns=False)
    assert trained == ids(tok, tool_call("add", a=2, b=3)) + [EOS]
    turns = parser_for("sft", "auto", False)(row).messages
    assert render_chat(tok, turns)[1] == tool_call("add", a=2, b=3)


@pytest.mark.parametrize("message, error", [
    ({"role": "user", "content": "hi", "tool_calls": [CALL]}, "only assistant messages call tools"),
    ({"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}, r"tool_calls\[0\]"),
    ({"role": "assistant", "content": None}, "string role and content"),
])
def test_malformed_tool_calls_are_refused_naming_the_message(message, error):
    with pytest.raises(ValueError, match=error):
        parser_for("sft", "auto")({"messages": [{"role": "user", "content": "q"}, message,
                                                {"role": "assistant", "content": "a"}]})


def test_a_bad_tools_column_and_a_tokenizer_without_template_are_refused():
    with pytest.raises(ValueError, match="field 'tools' must be a list"):
        parser_for("sft", "auto")({**ROW, "tools": "add"})
    with pytest.raises(DataError, match="need a chat template"):
        tokenize_record(make_tokenizer(), parser_for("sft", "auto")(ROW), 256, 128)
