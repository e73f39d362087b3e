"""JSONL readers, chat rendering, truncation rules and packing."""
import random
import re

import pytest

from fusedrl.engine.data.packing import collate_rm, collate_sft, epoch_batches, pack, pack_sequences
from fusedrl.engine.data.chat import render_chat
from fusedrl.engine.data.records import DataError, Demonstration, Ranking, parser_for
from fusedrl.engine.data.sources import read_records
from fusedrl.engine.config.train import DataConfig
from fusedrl.engine.data.loading import load_examples, split_off
from fusedrl.engine.data import tokenization
from fusedrl.engine.data.tokenization import TokenizedExample, tokenize_record, tokenize_records
from engine_testing import EOS, make_tokenizer
from train_testing import write_jsonl
from cli_testing import cli_error

HH_CHOSEN = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: the fox"
HH_REJECTED = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: no"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_every_format_parses(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "p", "response": "r"}, "",
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}])
    rows = read_records(sft, parser_for("sft", "auto")).records
    assert rows[0] == Demonstration("p", "r")
    assert rows[1].messages == (("user", "u"), ("assistant", "a")) and rows[1].response == "a"
    rm = write_jsonl(tmp_path / "rm.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "responses": ["a", "b", "c"]},
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    pair, ranking, hh = read_records(rm, parser_for("rm", "auto")).records
    assert pair == Ranking("p", ("a", "b")) and ranking == Ranking("p", ("a", "b", "c"))
    assert hh.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:"
    assert hh.responses == (" the fox", " no")


@pytest.mark.parametrize("line, reason", [
    ("{not json", "Expecting property name"),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt": "p"}', r"expected keys prompt\+chosen\+rejected"),
    ('{"prompt": "p", "chosen": "a", "rejected": 3}', "'rejected' must be a string"),
    ('{"prompt": "p", "chosen": "a", "rejected": "a"}', "identical"),
    ('{"prompt": "p", "responses": ["a"]}', "at least two strings"),
    ('{"prompt": "p", "responses": ["a", "b", "a"]}', "distinct"),
    ('{"chosen": "no turns", "rejected": "x"}', "must share a beginning"),
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: c\\n\\nAssistant: b"}',
     "do not share"),
])
def test_malformed_preference_lines_name_file_line_and_reason(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: .*{reason}"):
        read_records(path, parser_for("rm", "auto"))


@pytest.mark.parametrize("line, reason", [
    ('{"prompt": "p"}', "expected keys messages, prompt\\+completion, prompt\\+response or text"),
    ('{"prompt": "p", "response": ""}', "empty response"),
    ('{"messages": [{"role": "user", "content": "u"}]}', "at least two"),
    ('{"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}]}', "assistant turn"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "v"}]}', "messages\\[0\\]"),
])
def test_malformed_demonstration_lines(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [line])
    with pytest.raises(DataError, match=rf"bad\.jsonl:1: .*{reason}"):
        read_records(path, parser_for("sft", "auto"))


def test_explicit_format_requires_its_keys(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="format 'ranking' needs keys"):
        read_records(path, parser_for("rm", "ranking"))


def test_skip_malformed_counts_and_keeps_the_rest(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}, "oops", {"prompt": 1, "response": "r"},
                                               {"prompt": "q", "response": "s"}])
    result = read_records(path, parser_for("sft", "auto"), skip_malformed=True)
    assert [r.prompt for r in result.records] == ["p", "q"]
    assert result.skipped == 2 and result.errors[0].endswith("d.jsonl:2: Expecting value: line 1 column 1 (char 0)")
    with pytest.raises(DataError, match="no usable rows"):
        read_records(write_jsonl(tmp_path / "e.jsonl", ["x"]), parser_for("sft", "auto"),
                     skip_malformed=True)


def test_undecodable_bytes_are_a_file_line_error_or_skipped_and_reported(tokenizer, tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "caf\xff", "response": "r"}\n'
                     b'{"prompt": "q", "response": "s"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid UTF-8 \(byte 0xff at column 16\)"):
        read_records(path, parser_for("sft", "auto"))
    examples = load_examples(DataConfig(train_file=str(path), eval_fraction=0.0, skip_malformed=True, max_length=32,
                                        max_prompt_length=16, tokens_per_batch=64), tokenizer, "sft", 0)
    assert len(examples.train) == 2 and examples.info["skipped_lines"] == 1
    assert capsys.readouterr().err == ("fusedrl: skipped 1 malformed row(s) "
                                       "(data.skip_malformed=true), the first: "
                                       f"{path}:2: not valid UTF-8 (byte 0xff at column 16)\n")


def test_an_eval_file_that_is_the_train_file_is_said(tokenizer, tmp_path, capsys, monkeypatch):
    """The same file by another path (relative, through a link) is said too; another file is not."""
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"prompt": f"p{i}", "response": "r"} for i in range(3)])
    (tmp_path / "link.jsonl").symlink_to(path)
    other = tmp_path / "e.jsonl"
    write_jsonl(other, [{"prompt": "q", "response": "s"}])
    monkeypatch.chdir(tmp_path)
    for eval_file, said in (("link.jsonl", True), ("d.jsonl", True), (str(other), False)):
        examples = load_examples(DataConfig(train_file=str(path), eval_file=eval_file,
                                            eval_fraction=0.0, max_length=32,
                                            max_prompt_length=16, tokens_per_batch=64),
                                 tokenizer, "sft", 0)
        assert len(examples.train) == 3
        err = capsys.readouterr().err
        assert ("data.eval_file is data.train_file" in err) == said, (eval_file, err)
        if said:
            assert f"({eval_file})" in err and "leave data.eval_file unset" in err


class CountingTokenizer:
    """The test tokenizer, recording its calls and the longest text it was asked to encode (a call
    takes one text or a list of them)."""

    def __init__(self, tokenizer):
        self.inner, self.longest, self.calls = tokenizer, 0, 0
        self.eos_token_id, self.get_vocab = tokenizer.eos_token_id, tokenizer.get_vocab
        self.chat_template = getattr(tokenizer, "chat_template", None)

    def __call__(self, text, **kw):
        self.calls += 1
        self.longest = max(self.longest, *map(len, [text] if isinstance(text, str) else text))
        return self.inner(text, **kw)


def test_a_huge_line_costs_what_its_kept_tokens_cost(tokenizer):
    huge = "the quick brown fox jumps over the lazy dog " * 3000  # 130 kB of text
    counting = CountingTokenizer(tokenizer)
    ex = tokenize_record(counting, Demonstration(huge, huge), max_length=64, max_prompt_length=32)
    assert ex.prompt == tokenizer(huge)["input_ids"][-32:]
    assert ex.responses[0] == tokenizer(huge, add_special_tokens=False)["input_ids"][:32]
    assert counting.longest <= 2 * 32 * max(map(len, tokenizer.get_vocab()))


def _one_text_a_call(tokenizer, record, max_length, max_prompt_length):
    """Rules 1-3 spelled out with one tokenizer call per text: the oracle of the batched path."""
    prompt, responses = ((record.prompt, (record.response,)) if isinstance(record, Demonstration)
                         else (record.prompt, record.responses))
    ids = tokenizer(prompt)["input_ids"][-max_prompt_length:] if prompt else []
    room = max_length - len(ids)
    cut = [((tokenizer(r, add_special_tokens=False)["input_ids"] if r else []) + [EOS])[:room]
           for r in responses]
    return TokenizedExample(ids, tuple(cut)) if all(cut) else None


def test_a_data_set_is_tokenized_in_two_calls_with_each_text_s_own_ids(tokenizer, monkeypatch):
    """Prompts in one call, responses in one (up to TEXTS_PER_CALL texts a call), whatever the
    number of records; the ids and cuts those of one call per text."""
    words = "the quick brown fox jumps over the lazy dog hello world".split()
    rng = random.Random(0)

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))
    records = []
    for i in range(60):
        kind = i % 3
        if kind == 0:
            records.append(Demonstration(text(rng.randint(0, 30)), " " + text(rng.randint(0, 25))))
        elif kind == 1:
            records.append(Ranking(text(rng.randint(1, 30)),
                                   tuple(" " + text(rng.randint(1, 20)) for _ in range(3))))
        else:  # a prompt past max_prompt_length: its end is kept
            records.append(Demonstration(text(80), " " + text(3)))
    records += [Demonstration("", " hello"), Demonstration("the fox", "")]  # empty texts: no ids
    counting = CountingTokenizer(tokenizer)
    got = tokenize_records(counting, records, max_length=24, max_prompt_length=16)
    expected = [_one_text_a_call(tokenizer, r, 24, 16) for r in records]
    assert counting.calls == 2
    assert got == expected
    assert {len(e.prompt) for e in expected} >= {0, 16}  # an empty prompt and cut ones
    assert expected[-1].responses == ([EOS],)
    truncated = tokenize_records(tokenizer, records, max_length=12, max_prompt_length=11)
    assert truncated == [_one_text_a_call(tokenizer, r, 12, 11) for r in records]
    # A data set larger than a call's share: the same ids, ceil(texts / share) calls each
    monkeypatch.setattr(tokenization, "TEXTS_PER_CALL", 7)
    counting = CountingTokenizer(tokenizer)
    assert tokenize_records(counting, records, max_length=24, max_prompt_length=16) == expected
    prompts = sum(bool(r.prompt) for r in records)
    responses = sum(bool(t) for r in records
                    for t in ((r.response,) if isinstance(r, Demonstration) else r.responses))
    assert counting.calls == -(-prompts // 7) + -(-responses // 7)


def test_a_record_the_tokenizer_cannot_encode_is_named_by_its_row(tokenizer, tmp_path):
    """The batch's ValueError is found again one record at a time, naming the row."""
    class Refusing(CountingTokenizer):
        def __call__(self, text, **kw):
            texts = [text] if isinstance(text, str) else text
            if any("forbidden" in t for t in texts):
                raise ValueError("cannot encode this text")
            return super().__call__(text, **kw)
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "the fox", "response": " hello"}] * 3
                       + [{"prompt": "the dog", "response": " forbidden"}])
    cfg = DataConfig(train_file=str(path), eval_fraction=0.0, max_length=32,
                     max_prompt_length=16, tokens_per_batch=64)
    with pytest.raises(DataError, match=r"sft.jsonl:4: cannot encode this text"):
        load_examples(cfg, Refusing(tokenizer), "sft", 0)


def test_truncation_keeps_the_prompt_end_and_cuts_the_response_end(tokenizer):
    prompt_ids = tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]
    response_ids = tokenizer(" hello world hello world", add_special_tokens=False)["input_ids"]
    ex = tokenize_record(tokenizer, Demonstration("the quick brown fox jumps over the lazy dog",
                                                  " hello world hello world"), max_length=8, max_prompt_length=3)
    assert ex.prompt == prompt_ids[-3:]
    assert ex.responses == ((response_ids + [EOS])[:5],)
    full = tokenize_record(tokenizer, Demonstration("the fox", " hello"), max_length=64, max_prompt_length=32)
    assert full.responses[0][-1] == EOS  # room left: the response ends with EOS
    chat = tokenize_record(tokenizer, Demonstration("", "fox", (("user", "the"), ("assistant", "fox"))), 64, 32)
    assert chat.prompt == tokenizer("\n\nUser: the\n\nAssistant:")["input_ids"]
    assert chat.responses == (tokenizer(" fox", add_special_tokens=False)["input_ids"] + [EOS],)


def test_chat_rendering_uses_the_template_when_there_is_one(tokenizer):
    turns = (("user", "hi"), ("assistant", "hello"), ("user", "fox?"), ("assistant", "the fox"))
    assert render_chat(tokenizer, turns) == (
        "\n\nUser: hi\n\nAssistant: hello\n\nUser: fox?\n\nAssistant:", " the fox")
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    try:
        assert render_chat(tokenizer, turns) == ("<user>hi<assistant>hello<user>fox?<assistant>", "the fox")
    finally:
        tokenizer.chat_template = None


def test_targets_are_the_response_tokens_shifted_by_one():
    batch = pack_sequences([([1, 2], [3, 4], True), ([], [5, 6], True), ([7], [8], False)])
    # position i predicts token i + 1; an empty prompt leaves the first token without context
    assert batch.target_rows.tolist() == [1, 2, 4] and batch.target_ids.tolist() == [3, 4, 6]
    assert batch.target_counts == [2, 1, 0] and batch.num_targets == 3


def test_collate_packs_sequences_back_to_back():
    sft = collate_sft([TokenizedExample([1, 2], ([3],)), TokenizedExample([4], ([5, 6],))])
    assert sft.input_ids.tolist() == [1, 2, 3, 4, 5, 6] and sft.seqlens == [3, 3]
    assert sft.target_rows.tolist() == [1, 3, 4] and sft.target_ids.tolist() == [3, 5, 6]
    rm = collate_rm([TokenizedExample([1], ([2, 3], [4], [5]))])
    assert rm.input_ids.tolist() == [1, 2, 3, 1, 4, 1, 5] and rm.seqlens == [3, 2, 2]
    assert rm.group_sizes == [3] and rm.target_rows.tolist() == [0, 1] and rm.target_ids.tolist() == [2, 3]


def test_select_cuts_a_sub_batch_equal_to_packing_it_anew():
    rows = [([1, 2], [3, 4, 5], True), ([6], [7], True), ([8, 9, 10], [11, 12], True)]
    whole = pack_sequences(rows, width=3)
    for pick in ([2, 0], [1], [0, 1, 2]):
        got, expected = whole.select(pick), pack_sequences([rows[i] for i in pick], width=3)
        for name in ("input_ids", "target_rows", "target_ids", "grid_index"):
            assert getattr(got, name).tolist() == getattr(expected, name).tolist(), name
        assert got.seqlens == expected.seqlens and got.target_counts == expected.target_counts


def test_packing_respects_the_budget_in_order():
    assert pack([3, 4, 2, 5, 1], budget=6) == [[0], [1, 2], [3, 4]]
    with pytest.raises(ValueError, match="does not fit in tokens_per_batch=6"):
        pack([7], budget=6)


def test_epochs_reshuffle_deterministically():
    examples = [TokenizedExample([i], ([i],)) for i in range(20)]
    first = epoch_batches(examples, 6, seed=1, epoch=0)
    assert all(sum(e.num_tokens for e in b) <= 6 for b in first)
    assert sorted(e.prompt[0] for b in first for e in b) == list(range(20))
    assert first == epoch_batches(examples, 6, seed=1, epoch=0) != epoch_batches(examples, 6, seed=1, epoch=1)


def test_held_out_split_is_seeded_and_disjoint():
    train, held = split_off(100, 0.1, seed=3)
    assert len(held) == 10 and not set(train) & set(held) and split_off(100, 0.1, seed=3) == (train, held)
    assert split_off(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])


def test_fusedrl_sft_reports_a_malformed_line_without_a_traceback(qwen2_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}, '{"prompt": "p"}'])
    code, err = cli_error(["sft", f"model={qwen2_dir}", f"output_dir={tmp_path / 'run'}", f"data.train_file={data}",
                           "data.max_length=64", "data.max_prompt_length=32"], capsys)
    assert code == 1
    assert re.fullmatch(r"fusedrl sft: .*d\.jsonl:2: expected keys messages, .*\n", err)
