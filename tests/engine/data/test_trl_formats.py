"""TRL's data formats with a chat-templated tokenizer: SFT prompt+completion, text and multi-turn
messages, implicit and conversational preferences, RL prompts as message lists; one rendering."""
import pytest

from fusedrl.engine.data.chat import conversation_pieces, render_prompt
from fusedrl.engine.data.packing import collate_sft
from fusedrl.engine.data.prompts import column_lists, load_prompts
from fusedrl.engine.data.records import DataError, Demonstration, Ranking, parser_for
from fusedrl.engine.data.sources import read_records
from fusedrl.engine.data.tokenization import tokenize_record
from engine_testing import EOS, make_chat_tokenizer
from train_testing import write_jsonl

USER, ASSISTANT = "user", "assistant"


@pytest.fixture(scope="module")
def tok():
    return make_chat_tokenizer()


def msg(role, content):
    return {"role": role, "content": content}


def ids(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


def sft(row, all_turns=True):
    return parser_for("sft", "auto", all_turns)(row)


def rm(row):
    return parser_for("rm", "auto")(row)


def targets(tok, record):
    """(all token ids of the example, the ids that carry a loss) after SFT collation."""
    example = tokenize_record(tok, record, 128, 64)
    batch = collate_sft([example])
    return batch.input_ids.tolist(), batch.target_ids.tolist()


def test_string_prompt_completion_is_joined_as_it_is_with_eos(tok):
    record = sft({"prompt": "the quick", "completion": " brown fox"})
    assert record == Demonstration("the quick", " brown fox")
    example = tokenize_record(tok, record, 64, 32)
    assert example.prompt == ids(tok, "the quick", True)
    assert example.responses == (ids(tok, " brown fox") + [EOS],)


def test_message_list_prompt_completion_goes_through_the_template(tok):
    record = sft({"prompt": [msg(USER, "hello world")], "completion": [msg(ASSISTANT, "the fox")]})
    every, trained = targets(tok, record)
    prompt = "<|r2|>user\nhello world</s>\n<|r2|>assistant\n"
    assert every == ids(tok, prompt, True) + ids(tok, "the fox") + [EOS]
    assert trained == ids(tok, "the fox") + [EOS]


def test_text_trains_every_token_after_the_first(tok):
    record = sft({"text": "the lazy dog"})
    every, trained = targets(tok, record)
    assert every == ids(tok, "the lazy dog") + [EOS] and trained == every[1:]


def test_every_assistant_turn_is_trained_and_nothing_else(tok):
    row = {"messages": [msg("system", "be brief"), msg(USER, "hello"), msg(ASSISTANT, "the fox"),
                        msg(USER, "and?"), msg(ASSISTANT, "the lazy dog")]}
    every, trained = targets(tok, sft(row))
    # The whole rendered conversation, each turn's end-of-turn EOS the trained one.
    rendered = tok.apply_chat_template(row["messages"], tokenize=False)
    assert tok.decode(every) == rendered.rstrip("\n")
    assert trained == ids(tok, "the fox") + [EOS] + ids(tok, "the lazy dog") + [EOS]
    # data.train_on=last_turn: today's rule, the last turn alone after the rest as the prompt.
    every_last, trained_last = targets(tok, sft(row, all_turns=False))
    assert trained_last == ids(tok, "the lazy dog") + [EOS]
    assert every_last[:len(every_last) - len(trained_last)] == ids(
        tok, render_prompt(tok, [(m["role"], m["content"]) for m in row["messages"][:-1]]), True)


def test_a_template_that_rewrites_earlier_turns_is_refused_in_one_line(tok):
    rewriting = make_chat_tokenizer()
    rewriting.chat_template = ("{% for m in messages %}{% if loop.last %}"
                               "<{{ m['role'] }}>{{ m['content'] }}"
                               "{% else %}<{{ m['role'] }}>{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    turns = (("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    with pytest.raises(ValueError, match="set data.train_on=last_turn"):
        conversation_pieces(rewriting, turns, 0)


def test_implicit_string_preferences_split_at_the_common_prefix_as_trl(tok):
    record = rm({"chosen": "the sky is blue", "rejected": "the sky is green"})
    assert record == Ranking("the sky is", (" blue", " green"))


def test_conversational_preferences_render_the_prompt_with_the_template(tok):
    prompt = [msg(USER, "hello")]
    chosen, rejected = [msg(ASSISTANT, "the fox")], [msg(ASSISTANT, "dog")]
    explicit = rm({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    implicit = rm({"chosen": prompt + chosen, "rejected": prompt + rejected})
    assert explicit == implicit == Ranking("", ("the fox", "dog"), (("user", "hello"),))
    example = tokenize_record(tok, implicit, 64, 32)
    assert example.prompt == ids(tok, "<|r2|>user\nhello</s>\n<|r2|>assistant\n", True)
    assert example.responses == (ids(tok, "the fox") + [EOS], ids(tok, "dog") + [EOS])


@pytest.mark.parametrize("row, reason", [
    ({"chosen": [msg(USER, "a")], "rejected": [msg(USER, "b")]}, "share no first message"),
    ({"chosen": [msg(USER, "a"), msg(ASSISTANT, "b"), msg(USER, "c")],
      "rejected": [msg(USER, "a"), msg(ASSISTANT, "d")]},
     "chosen must be one assistant message"),
    ({"prompt": [msg(USER, "a")], "completion": "b"}, "both be strings or both be message lists"),
])
def test_malformed_trl_rows_say_why(row, reason):
    with pytest.raises(ValueError, match=reason):
        (sft if "completion" in row else rm)(row)


def test_rl_prompts_go_through_the_same_rendering_as_sft(tok, tmp_path, capsys):
    rows = [{"prompt": [msg("system", "be brief"), msg(USER, "what is 4?")], "solution": "4"},
            {"prompt": "hello world", "solution": "5", "level": 2}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    prompts, _ = load_prompts(path, tok, 64, 128)
    as_sft = sft({"prompt": rows[0]["prompt"], "completion": [msg(ASSISTANT, "4")]})
    sft_example = tokenize_record(tok, as_sft, 128, 64)
    assert prompts[0].ids == sft_example.prompt
    assert prompts[1].ids == ids(tok, "<|r2|>user\nhello world</s>\n<|r2|>assistant\n", True)
    assert [p.prompt for p in prompts] == [rows[0]["prompt"], "hello world"]
    assert column_lists(prompts) == {"solution": ["4", "5"], "level": [None, 2]}
    assert capsys.readouterr().err == (f"fusedrl: {path}: 1 string prompt(s) go through the "
                                       "tokenizer's chat template as a user turn "
                                       "(data.chat_template=auto; none keeps them as they are)\n")
    raw, _ = load_prompts(path, tok, 64, 128, chat_template="none")
    assert raw[1].ids == ids(tok, "hello world", True) and raw[0].ids == prompts[0].ids


def test_column_mapping_and_a_missing_mapped_column(tok, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "hello", "answer": "4"}, {"q": "x"}])
    with pytest.raises(DataError, match=r"q\.jsonl:2: no column 'question' \(data.prompt_column\); "
                                        r"the row has \['q'\]"):
        load_prompts(path, tok, 64, 128, prompt_column="question")
    write_jsonl(path, [{"question": "hello", "answer": "4"}])
    (row,), _ = load_prompts(path, tok, 64, 128, prompt_column="question")
    assert row.prompt == "hello" and row.columns == {"answer": "4"}
    sft_rows = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "a b", "output": " c"}])
    parse = parser_for("sft", "auto")
    mapping = {"prompt": "instruction", "completion": "output"}
    got = read_records(sft_rows, parse, columns=mapping).records
    assert got == [Demonstration("a b", " c")]


def test_an_rl_prompt_that_is_not_a_prompt_names_its_row(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": [{"role": "user"}]}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: prompt\[0\] must be an object with string"):
        load_prompts(path, tok, 64, 128)
    strict = make_chat_tokenizer()  # a template that refuses roles out of turn, as Llama 2's does
    strict.chat_template = ("{% for m in messages %}"
                            "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                            "{{ raise_exception('roles must alternate') }}{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
    write_jsonl(path, [{"prompt": [msg(USER, "a")]}, {"prompt": [msg(ASSISTANT, "b")]}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: the tokenizer's chat template refused these "
                                        r"messages: roles must alternate"):
        load_prompts(path, strict, 64, 128)
