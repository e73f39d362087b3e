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
