"""Mistakes caught before any work, each in one line: a model directory without a tokenizer (or
with an empty one), options a stage would not read, `--key value` taken as key=value, did-you-mean
across sections; the PPO minibatch rule for a size that does not divide the rollout; --quiet."""
import json
import re
import shutil

import pytest

from cli_testing import cli_error
from fusedrl.engine import cli
from fusedrl.engine.config import io as config_io
from fusedrl.engine.config.ppo import GRPOConfig
from fusedrl.engine.config.train import RMConfig, SFTConfig
from fusedrl.engine.stages.rollout.microbatches import minibatch_bounds
from fusedrl.engine.stages.ppo.update import minibatch_rule
from train_testing import demonstrations, write_jsonl


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", demonstrations(8))


def sft(model, out, data, *extra):
    return ["sft", f"model={model}", f"output_dir={out}", f"data.train_file={data}",
            "data.max_length=48", "data.max_prompt_length=24", *extra]


def test_a_model_directory_without_a_tokenizer_is_one_line(qwen2_dir, tmp_path, sft_data, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(qwen2_dir / name, bare / name)
    code, err = cli_error(sft(bare, tmp_path / "out", sft_data), capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"fusedrl sft: model={bare}: the model directory has no tokenizer (none of "
                          "tokenizer.json, tokenizer.model")
    assert err.endswith("save the tokenizer it was trained with there "
                        "(tokenizer.save_pretrained(DIR))\n")


def test_an_empty_tokenizer_is_one_line_before_the_directory_is_taken(qwen2_dir, tmp_path,
                                                                      sft_data, capsys):
    empty = tmp_path / "empty"
    shutil.copytree(qwen2_dir, empty)
    tokenizer = json.loads((empty / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"], tokenizer["added_tokens"] = {}, []
    tokenizer["model"].pop("merges", None)
    (empty / "tokenizer.json").write_text(json.dumps(tokenizer))
    code, err = cli_error(sft(empty, tmp_path / "out", sft_data), capsys)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"fusedrl sft: model={empty}: its tokenizer is empty"), err
    assert not (tmp_path / "out" / ".fusedrl-run").exists()


GRPO = ["policy=p", "prompts_file=q", "output_dir=o", "reward_fn=m:f"]
SFT = ["model=m", "output_dir=o", "data.train_file=d"]


@pytest.mark.parametrize("cls, overrides, message", [
    (GRPOConfig, ["optim.grad_accum_steps=4"],
     "optim.grad_accum_steps=4 would be ignored: it is not read by ppo or grpo, which take one "
     "optimizer step per minibatch"),
    (GRPOConfig, ["critic_lr=1e-4"],
     "critic_lr=0.0001 would be ignored: it is not read without a critic"),
    (GRPOConfig, ["ptx_file=p.jsonl"],
     "ptx_file='p.jsonl' would be ignored: it is not read with ppo.ptx_coef=0"),
    (GRPOConfig, ["rollout.max_sampling_rounds=8"], "without rollout.dynamic_sampling=true"),
    (GRPOConfig, ["ppo.is_cap=3"],
     "ppo.is_cap=3.0 would be ignored: it is not read without ppo.is_mode=tis"),
    (GRPOConfig, ["reward.kl_horizon=5"],
     "reward.kl_horizon=5 would be ignored: it is not read without reward.kl_target"),
    (SFTConfig, ["lora.alpha=32"],
     "lora.alpha=32.0 would be ignored: it is not read without adapters (lora.rank=0)"),
    (SFTConfig, ["data.eval_fraction=0", "train.eval_every=5"],
     "train.eval_every=5 would be ignored"),
    (RMConfig, ["data.eval_file=e.jsonl", "data.eval_fraction=0.2"], "with data.eval_file set"),
])
def test_an_option_the_stage_would_not_read_is_refused(cls, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config_io.load(cls, None, [*(GRPO if cls is GRPOConfig else SFT), *overrides])


def test_the_same_options_are_read_with_their_companion_set():
    config_io.load(SFTConfig, None, [*SFT, "lora.rank=8", "lora.alpha=32"])
    config_io.load(GRPOConfig, None, [*GRPO, "ppo.is_mode=tis", "ppo.is_cap=3"])
    config_io.load(GRPOConfig, None, [*GRPO, "rollout.dynamic_sampling=true",
                                      "rollout.max_sampling_rounds=8"])


def test_dashed_options_are_read_as_overrides(tmp_path, capsys):
    argv = ["sft", "--optim.lr", "1e-4", "--gradient-checkpointing", "--max_steps=3", "--bf16",
            "model=m", "--seed", "-1"]
    unknown = {"--optim.lr", "--gradient-checkpointing", "--max_steps=3", "--bf16", "--seed"}
    assert cli.dashed_as_overrides(argv, unknown) == [
        "sft", "optim.lr=1e-4", "gradient_checkpointing=true", "max_steps=3", "bf16=true",
        "model=m", "seed=-1"]
    base = ["sft", *SFT[:1], f"output_dir={tmp_path}", *SFT[2:]]
    dashed = ["--optim.lr", "2e-4", "--train.max-steps", "7", "--print-config"]
    assert cli.main([*base, *dashed]) == 0
    shown = capsys.readouterr().out
    assert "  lr: 0.0002\n" in shown and "  max_steps: 7\n" in shown


@pytest.mark.parametrize("given, meant", [
    (["--learning_rate", "1e-4"], "'learning_rate' (did you mean 'optim.lr'?)"),
    (["lr=1e-4"], "'lr' (did you mean 'optim.lr'?)"),
    (["optim.max_steps=3"], "'optim.max_steps' (did you mean 'train.max_steps'?)"),
    (["train.max_step=3"], "'train.max_step' (did you mean 'train.max_steps'?)"),
    (["optim.eval_every=3"], "'optim.eval_every' (did you mean 'train.eval_every'?)"),
])
def test_an_unknown_key_gets_a_did_you_mean_from_any_section(tmp_path, capsys, given, meant):
    code, err = cli_error(["sft", *SFT[:1], f"output_dir={tmp_path}", *SFT[2:], *given], capsys)
    assert code == 2 and err.count("\n") == 1 and f"unknown config key {meant}" in err, err


def test_a_minibatch_size_that_does_not_divide_the_rows_takes_equal_minibatches_and_says_so():
    assert minibatch_bounds(16, 5) == [(0, 4), (4, 8), (8, 12), (12, 16)]  # not 5, 5, 5 and 1
    assert minibatch_bounds(17, 5) == [(0, 4), (4, 8), (8, 12), (12, 17)]
    assert minibatch_bounds(16, 4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert minibatch_bounds(6, 100) == [(0, 6)]
    assert minibatch_rule(16, 4) is None and minibatch_rule(6, 100) is None
    assert minibatch_rule(16, 5) == (
        "ppo.minibatch_size=5 does not divide the rollout's 16 rows per rank "
        "(rollout.prompts_per_iteration x rollout.samples_per_prompt): each epoch takes 4 "
        "minibatches of 4 rows")
    assert minibatch_rule(17, 5).endswith("4 minibatches of 5 or 4 rows")


def test_quiet_turns_off_the_progress_and_the_libraries_own_output(tmp_path, capsys, monkeypatch):
    import transformers
    for name in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS",
                 "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    level = transformers.utils.logging.get_verbosity()
    try:
        argv = ["sft", *SFT[:1], f"output_dir={tmp_path}", *SFT[2:], "--quiet", "--print-config"]
        assert cli.main(argv) == 0
        assert "  progress: false\n" in capsys.readouterr().out
        assert transformers.utils.logging.get_verbosity() == transformers.logging.ERROR
        assert not transformers.utils.logging.is_progress_bar_enabled()
    finally:
        transformers.utils.logging.set_verbosity(level)
        transformers.utils.logging.enable_progress_bar()


def test_a_key_set_twice_takes_the_last_and_quiet_beside_progress_true_is_refused(tmp_path,
                                                                                    capsys):
    """A wrapper's defaults then the user's own values: the last wins; --quiet and
    train.progress=true contradict each other."""
    base = ["sft", *SFT[:1], f"output_dir={tmp_path}", *SFT[2:], "--print-config"]
    assert cli.main([*base, "train.max_steps=5", "optim.lr=1e-4", "train.max_steps=7"]) == 0
    assert "  max_steps: 7\n" in capsys.readouterr().out
    code, err = cli_error([*base, "--quiet", "train.progress=true"], capsys)
    assert (code, err) == (2, "fusedrl sft: --quiet sets train.progress=false, and the command "
                              "line sets train.progress=true: give one of them\n")
