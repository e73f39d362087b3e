"""Inputs bounded before they cost anything: a config.json whose weights cannot fit the device (or
deeper than any model) refused in one line before any allocation; --prompt-file lines capped and
never read from a FIFO or device; weights that are not regular files refused; a chat template that
loops without end stopped; --kv-cache-memory inf one line."""
import json
import os
import shutil

import pytest
import torch

from fusedrl.engine.data import chat
from fusedrl.engine.data.records import DataError
from fusedrl.engine.errors import ModelError
from fusedrl.engine.model.causal_lm import CausalLM
from fusedrl.engine.model.footprint import parameter_count
from fusedrl.engine.model.hf_io import load_config, load_model, load_tokenizer
from cli_testing import cli_error
from moe_testing import save_moe_base


def edited_model(source, target, **changes):
    """A copy of the model directory `source`, its config.json changed (None: key removed)."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    for key, value in changes.items():
        config.pop(key, None) if value is None else config.__setitem__(key, value)
    (target / "config.json").write_text(json.dumps(config))
    return target


def generate(model, *extra):
    return ["generate", "--model", str(model), *extra]


def test_parameter_count_is_the_decoder_s_own(model_dirs, tmp_path):
    dirs = [path for path, _ in model_dirs.values()] + [save_moe_base(tmp_path / "moe")]
    for path in dirs:
        config = load_config(path)
        with torch.device("meta"):
            model = CausalLM(config, torch.float32)
        assert parameter_count(config) == sum(p.numel() for p in model.parameters()), path


def test_an_absurd_model_is_refused_before_allocating(qwen2_dir, tmp_path, capsys):
    wide = edited_model(qwen2_dir, tmp_path / "wide", hidden_size=2**20)
    code, err = cli_error(generate(wide, "--prompt", "hi", "--device", "cpu"), capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"fusedrl generate: {wide}: config.json describes 6,598,199,083,008 "
                          "parameters, 26.4 TB of float32 weights, more than the "), err


def test_a_model_deeper_than_any_is_refused_before_transformers_reads_it(qwen2_dir, tmp_path):
    deep = edited_model(qwen2_dir, tmp_path / "deep", num_hidden_layers=10**6, layer_types=None)
    with pytest.raises(ModelError, match="num_hidden_layers=1000000 exceeds 4096"):
        load_model(deep)


@pytest.mark.parametrize("size", ["hidden_size", "vocab_size", "num_hidden_layers",
                                  "max_position_embeddings"])
def test_a_size_config_json_leaves_out_is_named_not_filled_with_a_default(qwen2_dir, tmp_path,
                                                                          size):
    """transformers would fill it with Llama 2 7B's value: a model of other shapes than its
    weights, or (the context length) a silent 2048."""
    missing = edited_model(qwen2_dir, tmp_path / "missing", **{size: None})
    with pytest.raises(ModelError, match=f"config.json has no {size}: expected the model's own"):
        load_config(missing)


def test_a_decoder_given_as_a_reward_model_is_named_as_such(qwen2_dir):
    """A language model's directory where a reward model is expected (reward_model=): the error
    says what the directory is not, and the option that gave it."""
    from fusedrl.engine.model.reward_model import load_reward_model
    from fusedrl.engine.stages.rollout.build import named
    with pytest.raises(ModelError) as refused, named("reward_model", qwen2_dir):
        load_reward_model(qwen2_dir)
    line = str(refused.value)
    assert line.startswith(f"reward_model={qwen2_dir}: missing tensor 'score.weight'"), line
    assert line.endswith("the directory is not a reward model (`fusedrl rm`: a score head)")


def test_weights_that_are_not_a_regular_file_are_refused(qwen2_dir, tmp_path):
    fifo = edited_model(qwen2_dir, tmp_path / "fifo")
    (fifo / "model.safetensors").unlink()
    os.mkfifo(fifo / "model.safetensors")
    with pytest.raises(ModelError, match="model.safetensors: not a regular file"):
        load_model(fifo)


def test_prompt_file_lines_are_capped_and_never_read_from_a_device(qwen2_dir, tmp_path, capsys):
    long = tmp_path / "long.txt"
    long.write_bytes(b"hi\n" + b"a" * 30_000_000 + b"\n")
    code, err = cli_error(generate(qwen2_dir, "--prompt-file", str(long)), capsys)
    assert (code, err) == (1, f"fusedrl generate: {long}:2: longer than 1048576 bytes, the most a "
                              "line may hold here\n")
    os.mkfifo(tmp_path / "fifo")
    for source in ("/dev/zero", str(tmp_path / "fifo")):
        code, err = cli_error(generate(qwen2_dir, "--prompt-file", source), capsys)
        assert (code, err) == (2, f"fusedrl generate: --prompt-file {source}: not a regular file "
                                  "(a directory, FIFO or device); expected a text file of one "
                                  "prompt per line\n")


def test_kv_cache_memory_that_is_no_size_is_one_line(qwen2_dir, capsys):
    for value in ("inf", "nan", "0", "lots"):
        code, err = cli_error(generate(qwen2_dir, "--prompt", "hi", "--kv-cache-memory", value),
                              capsys)
        assert (code, err) == (2, f"fusedrl generate: --kv-cache-memory {value}: expected bytes "
                                  "(e.g. 2000000000) or a fraction of free GPU memory in (0, 1] "
                                  "(e.g. 0.5)\n")


def test_a_chat_template_that_never_ends_is_stopped(qwen2_dir, monkeypatch):
    tokenizer = load_tokenizer(qwen2_dir)
    turns = [("user", "hi"), ("assistant", "hello")]
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    assert chat.render_chat(tokenizer, turns) == ("<user>hi", "hello")
    loops = "".join("{% for x" + str(i) + " in range(100000) %}" for i in range(5))
    tokenizer.chat_template = loops + "." + "{% endfor %}" * 5
    monkeypatch.setattr(chat, "TEMPLATE_SECONDS", 0.5)
    with pytest.raises(DataError, match="chat template took more than 0.5 seconds to render 1"):
        chat.render_chat(tokenizer, turns)
