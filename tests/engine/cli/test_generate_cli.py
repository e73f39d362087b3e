"""`fusedrl generate` through the command's parser."""
import json

import pytest

from fusedrl.engine import LLM, SamplingParams, cli
from fusedrl.engine.cli.generate import parse_memory
from fusedrl.engine.errors import UsageError


def parse(argv):
    return cli.build_parser().parse_args(argv)


def test_generate_prints_the_engine_s_completions_as_json(qwen2_dir, tmp_path, capsys):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("the lazy dog\n\nquick brown\n")
    args = parse(["generate", "--model", str(qwen2_dir), "--prompt", "hello world", "--prompt-file",
                  str(prompt_file), "--n", "2", "--temperature", "0.8", "--seed", "7",
                  "--max-new-tokens", "5", "--json", "--kv-cache-memory", "1000000"])
    assert args.run(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [
        (p, j) for p in ("hello world", "the lazy dog", "quick brown") for j in (0, 1)]
    expected = LLM(qwen2_dir).generate(["hello world", "the lazy dog", "quick brown"], SamplingParams(
        n=2, temperature=0.8, seed=7, max_new_tokens=5))
    assert [r["token_ids"] for r in rows] == [c.token_ids for o in expected for c in o.outputs]
    assert all(len(r["logprobs"]) == len(r["token_ids"]) for r in rows)


def test_memory_argument_reads_bytes_or_a_fraction():
    assert parse_memory("2000000000") == 2_000_000_000
    assert parse_memory("2e9") == 2_000_000_000
    assert parse_memory("0.5") == 0.5


def test_generate_without_prompts_fails_clearly(qwen2_dir):
    args = parse(["generate", "--model", str(qwen2_dir)])
    with pytest.raises(UsageError, match="--prompt"):
        args.run(args)


def test_flags_are_aliases_of_the_config_keys(tmp_path, capsys):
    config = tmp_path / "generate.yaml"
    config.write_text("model: m\nprompts: [from the file]\nmax_new_tokens: 9\ntemperature: 0.5\n")
    flags = ["generate", "--config", str(config), "--prompt", "a = b", "--prompt", 'say "hi"',
             "--max-new-tokens", "5", "--kv-cache-memory", "2e9", "--no-progress", "--json",
             "--print-config"]
    keys = ["generate", "--config", str(config), 'prompts=["a = b", "say \\"hi\\""]',
            "max_new_tokens=5", "kv_cache_memory=2000000000", "progress=false", "json=true",
            "--print-config"]
    printed = []
    for argv in (flags, keys):
        assert cli.main(argv) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1]
    assert "max_new_tokens: 5\ntemperature: 0.5\n" in printed[0] and "- a = b\n" in printed[0]


def test_a_generate_key_typo_is_one_line_with_its_fix(capsys):
    assert cli.main(["generate", "model=m", "max_new_token=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusedrl generate: unknown config key 'max_new_token' (did you mean "
                          "'max_new_tokens'?)")


def test_a_chat_template_and_tools_render_the_prompt_as_the_tool_rollout_opens(tmp_path, capsys):
    """The tool demo's model tried from the command line: the prompt the engine completes is the
    opening the tool rollout gives the model (its chat template, the tool's schema, the generation
    prompt)."""
    from fusedrl.engine.agents import ChatRenderer, tool_schema
    from fusedrl.engine.demos.sorting_task import build_base_model
    from fusedrl.engine.demos.tool_task import add, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_base_model(tmp_path / "model", 0, "llama", tokenizer, 128)
    question = "what is 482 + 377 ?"
    assert cli.main(["generate", "--model", model, "--prompt", question, "--chat-template",
                     "--tool", "fusedrl.engine.demos.tool_task:add", "--temperature", "0",
                     "--max-new-tokens", "4", "--json", "--no-progress", "--device", "cpu"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    opening = ChatRenderer(tokenizer, [tool_schema(add)]).opening([{"role": "user", "content": question}])
    (expected,) = LLM(model, device="cpu").generate([opening], SamplingParams(temperature=0, max_new_tokens=4))
    assert row["prompt"] == question and row["token_ids"] == expected.outputs[0].token_ids
    assert opening != tokenizer.encode(question)  # the template and the schema are in it


def test_tools_without_the_chat_template_or_a_template_less_model_are_one_line(qwen2_dir, capsys):
    code = cli.main(["generate", "--model", str(qwen2_dir), "--prompt", "hi", "--tool", "m:f"])
    assert (code, capsys.readouterr().err) == (
        2, "fusedrl generate: tools=['m:f'] are offered through the chat template: set "
           "chat_template=true (--chat-template)\n")
    code = cli.main(["generate", "--model", str(qwen2_dir), "--prompt", "hi", "--chat-template",
                     "--tool", "fusedrl.engine.demos.tool_task:nothing"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fusedrl generate: --tool='fusedrl.engine.demos.tool_task:"
                                        "nothing': ") and err.count("\n") == 1, err
    code = cli.main(["generate", "--model", str(qwen2_dir), "--prompt", "hi", "--chat-template"])
    assert (code, capsys.readouterr().err) == (
        2, f"fusedrl generate: --chat-template: the tokenizer of --model {qwen2_dir} has no chat "
           "template (chat_template.jinja, or chat_template in tokenizer_config.json)\n")


def test_a_mistyped_flag_value_is_one_line_without_the_usage(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["generate", "--n", "two"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("fusedrl generate: argument --n: invalid int value: 'two' "
                                       "(see `fusedrl generate --help`)\n")


def test_a_jsonl_prompt_file_gives_each_row_s_prompt(qwen2_dir, tmp_path, capsys):
    """A run's prompts file (`{"prompt": ...}` rows) completes each row's prompt, not the row's
    JSON text; a line of text whose first character is a brace stays text."""
    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"prompt": "the lazy dog", "answer": "x"}\n\n{"prompt": "{a} b"}\n')
    text = tmp_path / "prompts.txt"
    text.write_text('{"prompt": "hello world"}\n{not json} at all\n')
    common = ["--model", str(qwen2_dir), "--temperature", "0", "--max-new-tokens", "2", "--json",
              "--no-progress", "--kv-cache-memory", "1000000"]
    for path, expected in [(rows, ["the lazy dog", "{a} b"]),
                           (text, ["hello world", "{not json} at all"])]:
        if path == text:  # its first line is an object: every line must be one
            code, err = cli.main(["generate", "--prompt-file", str(path), *common]), capsys.readouterr().err
            assert (code, err) == (1, f"fusedrl generate: {path}:2: expected a JSON object with a "
                                      "\"prompt\" (the file's lines are JSON objects), got '{not json} "
                                      "at all'\n")
            continue
        assert cli.main(["generate", "--prompt-file", str(path), *common]) == 0
        printed = [json.loads(line)["prompt"] for line in capsys.readouterr().out.splitlines()]
        assert printed == expected
    raw = tmp_path / "raw.txt"
    raw.write_text("{not json} at all\nhello world\n")
    assert cli.main(["generate", "--prompt-file", str(raw), *common]) == 0
    assert [json.loads(line)["prompt"] for line in capsys.readouterr().out.splitlines()] == [
        "{not json} at all", "hello world"]


@pytest.mark.parametrize("lines, says", [
    ('{"text": "hi"}\n', "1: expected \"prompt\": a non-empty string or a message list, got the keys ['text']"),
    ('{"prompt": 3}\n', "1: expected \"prompt\": a non-empty string or a message list, got 3"),
    ('{"prompt": ""}\n', "1: expected \"prompt\": a non-empty string or a message list, got ''"),
    ('{"prompt": "a"}\n{"prompt": [{"role": "user"}]}\n',
     "2: prompt[0] must be an object with string role and content"),
    ('{"prompt": [{"role": "user", "content": "hi"}]}\n',
     "1: a message list as \"prompt\" is rendered through the chat template: pass --chat-template (and "
     "no --image), or give the prompt as a string"),
    ('{"prompt": "a"}\n["b"]\n', "2: expected a JSON object with a \"prompt\" (the file's lines are JSON "
                                 "objects), got '[\"b\"]'"),
])
def test_a_prompt_file_row_without_a_usable_prompt_is_refused_by_file_and_line(qwen2_dir, tmp_path, capsys,
                                                                               lines, says):
    path = tmp_path / "prompts.jsonl"
    path.write_text(lines)
    code = cli.main(["generate", "--model", str(qwen2_dir), "--prompt-file", str(path)])
    assert (code, capsys.readouterr().err) == (1, f"fusedrl generate: {path}:{says}\n")


def test_an_empty_prompt_file_is_named(qwen2_dir, tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    for text in ("", "\n  \n"):
        path.write_text(text)
        code = cli.main(["generate", "--model", str(qwen2_dir), "--prompt-file", str(path), "--prompt", "hi"])
        assert (code, capsys.readouterr().err) == (
            2, f"fusedrl generate: --prompt-file {path} has no prompts (it is empty or blank); expected one "
               "prompt per line\n")


def test_a_message_list_prompt_renders_through_the_chat_template(tmp_path, capsys):
    """A row's message list is the conversation the chat template renders, as a run renders it: the
    same tokens as the same question given as a string prompt (one user turn)."""
    from fusedrl.engine.demos.sorting_task import build_base_model
    from fusedrl.engine.demos.tool_task import build_tokenizer

    model = build_base_model(tmp_path / "model", 0, "llama", build_tokenizer(), 128)
    question = "what is 482 + 377 ?"
    path = tmp_path / "prompts.jsonl"
    messages = [{"role": "user", "content": question}]
    path.write_text(json.dumps({"prompt": messages}) + "\n")
    common = ["--model", model, "--chat-template", "--temperature", "0", "--max-new-tokens", "4", "--json",
              "--no-progress", "--device", "cpu"]
    assert cli.main(["generate", "--prompt-file", str(path), *common]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert cli.main(["generate", "--prompt", question, *common]) == 0
    (same,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["prompt"] == messages and row["token_ids"] == same["token_ids"]
    assert cli.main(["generate", "--prompt-file", str(path), *[a for a in common if a != "--json"]]) == 0
    assert capsys.readouterr().out.startswith(f"[0.0] {json.dumps(messages)}")
