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
