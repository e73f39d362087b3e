"""Every user mistake reaches the user as one line naming what was wrong: exit 2 for usage errors,
1 for failures, a traceback only with --debug or FUSEDRL_DEBUG=1. The first test runs the command
as the user does (a subprocess); the others call it in-process, which prints the same line."""
import json

import pytest
import torch

from fusedrl.engine import cli
from fusedrl.engine.errors import UsageError
from cli_testing import assert_one_line_error, cli_error, run_fusedrl
from train_testing import demonstrations, write_jsonl

SFT_SIZES = ["data.max_length=64", "data.max_prompt_length=32"]


@pytest.fixture
def sft_data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", demonstrations(4))


def sft(model, out, data, *extra):
    return ["sft", f"model={model}", f"output_dir={out}", f"data.train_file={data}", *SFT_SIZES, *extra]


def test_the_user_sees_one_line_and_the_exit_code_and_debug_shows_the_traceback(tmp_path, sft_data):
    typo = run_fusedrl(*sft(tmp_path / "m", tmp_path / "o", sft_data, "optim.lrr=1"))
    assert_one_line_error(typo, 2, "fusedrl sft: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)")
    debug = run_fusedrl("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi", "--debug",
                        env={"FUSEDRL_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UsageError: --model=" in debug.stderr


def test_a_missing_model_is_one_line(tmp_path, sft_data, capsys):
    code, err = cli_error(sft(tmp_path / "nowhere", tmp_path / "o", sft_data), capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"fusedrl sft: model={tmp_path / 'nowhere'}: no such directory")


def test_output_dir_is_checked_before_any_model_loads(qwen2_dir, tmp_path, sft_data, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((qwen2_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 5)  # would fail if loaded
    as_file = tmp_path / "a_file"
    as_file.write_text("")
    code, err = cli_error(sft(broken, as_file, sft_data), capsys)
    assert (code, err) == (2, f"fusedrl sft: output_dir={as_file}: exists and is not a directory\n")
    code, err = cli_error(sft(broken, as_file / "run", sft_data), capsys)
    assert code == 2 and err.startswith(f"fusedrl sft: output_dir={as_file / 'run'}: not a writable directory")


def test_broken_models_are_one_line_failures(qwen2_dir, tmp_path, sft_data, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((qwen2_dir / "config.json").read_text())
    weights = (qwen2_dir / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # a truncated download
    for f in qwen2_dir.glob("tokenizer*"):
        (model / f.name).write_bytes(f.read_bytes())
    code, err = cli_error(sft(model, tmp_path / "run", sft_data), capsys)
    assert code == 1 and err.startswith(f"fusedrl sft: {model / 'model.safetensors'}: not a readable safetensors file")
    config = json.loads((qwen2_dir / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    code, err = cli_error(sft(model, tmp_path / "run", sft_data), capsys)
    assert code == 1 and "unsupported model_type 'gpt2'" in err and err.count("\n") == 1


def test_debug_switches_on_the_traceback(tmp_path, sft_data, monkeypatch):
    monkeypatch.delenv("FUSEDRL_DEBUG", raising=False)
    with pytest.raises(UsageError, match="no such directory"):
        cli.main(["--debug", *sft(tmp_path / "nowhere", tmp_path / "o", sft_data)])
    monkeypatch.setenv("FUSEDRL_DEBUG", "1")
    with pytest.raises(UsageError, match="no such directory"):
        cli.main(sft(tmp_path / "nowhere", tmp_path / "o", sft_data))


def test_context_device_and_data_mistakes(qwen2_dir, tmp_path, sft_data, capsys):
    for lora in ("lora.rank=0", "lora.rank=4"):  # refused before output_dir is taken: nothing left
        code, err = cli_error(sft(qwen2_dir, tmp_path / "run", sft_data, "data.max_length=1024", lora),
                              capsys)
        assert code == 2 and "data.max_length=1024 exceeds the model's context of 128 tokens" in err
        assert not (tmp_path / "run").exists()
    if not torch.cuda.is_available():
        code, err = cli_error(sft(qwen2_dir, tmp_path / "run", sft_data, "train.device=cuda"), capsys)
        assert (code, err) == (2, "fusedrl sft: train.device='cuda' but no CUDA GPU is available to torch "
                                  "(use train.device=cpu)\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(sft_data.read_bytes() + b'{"prompt": "caf\xe9", "response": "x"}\n')
    code, err = cli_error(sft(qwen2_dir, tmp_path / "run", bad), capsys)
    assert (code, err) == (1, f"fusedrl sft: {bad}:5: not valid UTF-8 (byte 0xe9 at column 16)\n")


def test_generate_rejects_bad_input_in_one_line(qwen2_dir, tmp_path, capsys):
    code, err = cli_error(["generate", "--model", str(qwen2_dir), "--prompt", "hi", "--n", "0"], capsys)
    assert code == 2 and err.startswith("fusedrl generate: --n=0 is invalid")
    code, err = cli_error(["generate", "--model", str(tmp_path), "--prompt", "hi"], capsys)
    assert (code, err) == (2, f"fusedrl generate: --model={tmp_path}: not a Hugging Face model directory "
                              "(no config.json)\n")
    code, err = cli_error(["generate", "--model", str(qwen2_dir), "--prompt-file", str(tmp_path / "none.txt")], capsys)
    assert (code, err) == (2, f"fusedrl generate: --prompt-file {tmp_path / 'none.txt'}: No such file or directory\n")
    code, err = cli_error(["generate", "--model", str(qwen2_dir), "--prompt", "hello " * 200,
                           "--kv-cache-memory", "1000000", "--no-progress"], capsys)
    assert code == 2 and "leaves no room to generate" in err


def ppo(policy, out, prompts, *extra):
    # reward_testing: the reward worker imports the function's module, and this one brings torch.
    return ["ppo", f"policy={policy}", f"output_dir={out}", f"prompts_file={prompts}", "critic=shared",
            "reward_fn=reward_testing:vowel_fraction", "train.device=cpu", "train.progress=false",
            "train.iterations=1", "rollout.max_new_tokens=4", "rollout.prompts_per_iteration=2", *extra]


def test_a_user_mistake_is_never_unexpected(qwen2_dir, tmp_path, capsys):
    """One test per kind of ValueError a user's options or data could raise mid-run: each is a
    one-line usage error (2) or failure (1), never "unexpected" (which is kept for our bugs)."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello world"}, {"prompt": "the lazy dog"}])
    # A value the loss kernels would reject after the models are built: refused with the config.
    code, err = cli_error(ppo(qwen2_dir, tmp_path / "a", prompts, "ppo.dual_clip=0.5"), capsys)
    assert (code, err) == (2, "fusedrl ppo: ppo.dual_clip must be > 1 or null, got 0.5\n")
    code, err = cli_error(ppo(qwen2_dir, tmp_path / "a", prompts, "reward.kl_target=0"), capsys)
    assert (code, err) == (2, "fusedrl ppo: reward.kl_target must be > 0 or null, got 0.0\n")
    # A value found wrong where it is used: the KV pool of the rollout engine.
    code, err = cli_error(ppo(qwen2_dir, tmp_path / "b", prompts, "rollout.kv_cache_memory=1"), capsys)
    assert code == 2 and err.startswith("fusedrl ppo: kv_cache_memory=1 does not hold one block"), err
    # Data that does not fit the options: a preference pair longer than a micro-batch.
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "the quick brown fox " * 4, "chosen": " hello world" * 6,
                                                    "rejected": " the lazy dog" * 6}] * 4)
    code, err = cli_error(["rm", f"model={qwen2_dir}", f"output_dir={tmp_path / 'c'}", f"data.train_file={pairs}",
                           "data.max_length=64", "data.max_prompt_length=32", "data.tokens_per_batch=64",
                           "train.device=cpu", "train.progress=false"], capsys)
    assert code == 2 and "does not fit in tokens_per_batch=64" in err and err.count("\n") == 1, err
    # A model directory of the wrong kind: a failure naming the tensor, exit 1.
    code, err = cli_error(ppo(qwen2_dir, tmp_path / "d", prompts, f"reward_model={qwen2_dir}", "reward_fn=null",
                              "critic=separate"), capsys)
    assert code == 1 and "missing tensor 'score.weight'" in err and "unexpected" not in err, err


def test_a_config_error_under_torchrun_is_one_usage_line_from_rank_0(tmp_path, sft_data):
    from fusedrl.engine.config.train import DataConfig, SFTConfig
    from dist_testing import torchrun

    cfg = SFTConfig(model=str(tmp_path / "m"), output_dir=str(tmp_path / "o"), data=DataConfig(train_file=str(sft_data)))
    result = torchrun("sft", cfg, tmp_path, overrides=["optim.lr=-1"], timeout=120)
    ours = [line for line in result.stderr.splitlines() if line.startswith("fusedrl sft:")]
    assert result.returncode != 0 and ours == ["fusedrl sft: optim.lr must be a finite number > 0, got -1.0"], \
        result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr and "unexpected" not in result.stderr
