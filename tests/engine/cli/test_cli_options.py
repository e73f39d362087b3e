"""Options mean what they say: a section override changes that one option of the command's own
defaults (GRPO's too), from the command line and from YAML alike, as --print-config shows; a resumed
run applies a changed option and records it, or refuses it naming both values; non-finite numbers,
a YAML list, deep nesting and impossible model sizes are one-line errors before any work."""
import json
import shutil

import pytest
import yaml

from fusedrl.engine import cli
from fusedrl.engine.config import io as config_io
from fusedrl.engine.config.ppo import GRPOConfig, PPOConfig
from fusedrl.engine.train.runlog import read_metrics
from cli_testing import cli_error
from train_testing import demonstrations, write_jsonl

RL_REQUIRED = ["policy=p", "prompts_file=f", "output_dir=o", "reward_fn=m:f"]
CHANGES = ["rollout.max_new_tokens=8", "reward.normalize=true", "ppo.clip_eps=0.3"]


def rl_defaults(cls) -> dict:
    """The command's defaults with CHANGES applied by hand: what --print-config must print."""
    expected = config_io.to_dict(cls(policy="p", prompts_file="f", output_dir="o", reward_fn="m:f"))
    expected["rollout"]["max_new_tokens"] = 8
    expected["reward"]["normalize"] = True
    expected["ppo"]["clip_eps"] = 0.3
    return expected


def test_grpo_section_overrides_keep_grpos_other_defaults(tmp_path, capsys):
    assert cli.main(["grpo", *RL_REQUIRED, *CHANGES, "--print-config"]) == 0
    printed = capsys.readouterr()
    assert printed.err == "", printed.err
    shown = yaml.safe_load(printed.out)
    assert shown == rl_defaults(GRPOConfig)
    # GRPO's own: 8 samples per prompt, no KL in the reward, the grpo estimator without a critic.
    assert (shown["rollout"]["samples_per_prompt"], shown["reward"]["kl_coef"], shown["ppo"]["estimator"],
            shown["critic"]) == (8, 0.0, "grpo", "none")
    # The same sections from a YAML file.
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump({"rollout": {"max_new_tokens": 8}, "reward": {"normalize": True},
                                    "ppo": {"clip_eps": 0.3}}))
    assert config_io.to_dict(config_io.load(GRPOConfig, path, RL_REQUIRED)) == rl_defaults(GRPOConfig)
    # PPO keeps its own defaults under the same overrides.
    assert config_io.to_dict(config_io.load(PPOConfig, None, RL_REQUIRED + CHANGES)) == rl_defaults(PPOConfig)
    # --help shows each command's own defaults.
    grpo_help, ppo_help = (config_io.describe(cls) for cls in (GRPOConfig, PPOConfig))
    assert any(line.startswith("  rollout.samples_per_prompt (int, default 8)") for line in grpo_help)
    assert any(line.startswith("  rollout.samples_per_prompt (int, default 4)") for line in ppo_help)
    assert any(line.startswith("  reward.kl_coef (float, default 0.0)") for line in grpo_help)


def test_every_training_command_prints_its_config(capsys):
    for argv in (["sft", "model=m", "output_dir=o", "data.train_file=t"],
                 ["rm", "model=m", "output_dir=o", "data.train_file=t"],
                 ["ppo", *RL_REQUIRED], ["grpo", *RL_REQUIRED], ["demo", "rl_prompts=4"]):
        assert cli.main([*argv, "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["output_dir"] in ("o", "fusedrl-demo")


def test_print_config_needs_no_output_dir_and_a_run_still_does(capsys):
    for stage in ("sft", "rm", "ppo", "grpo"):
        assert cli.main([stage, "--print-config", "seed=3"]) == 0
        shown = yaml.safe_load(capsys.readouterr().out)
        assert (shown["output_dir"], shown["seed"]) == ("", 3)
        code, err = cli_error([stage, "seed=3"], capsys)
        assert (code, err) == (2, f"fusedrl {stage}: output_dir is required\n")


@pytest.mark.parametrize("option", ["optim.eps=.inf", "optim.weight_decay=.inf", "ppo.kl_loss_coef=.inf",
                                    "ppo.ent_coef=.inf", "rollout.temperature=.inf", "rollout.temperature=.nan",
                                    "critic_lr=.inf", "lora.alpha=-.inf", "reward.fn_timeout_s=.inf"])
def test_non_finite_options_are_refused_before_any_work(option, capsys):
    key, _, value = option.partition("=")
    shown = {".inf": "inf", "-.inf": "-inf", ".nan": "nan"}[value]
    code, err = cli_error(["grpo", *RL_REQUIRED, option], capsys)
    assert (code, err) == (2, f"fusedrl grpo: {key} must be a finite number, got {shown}\n")


@pytest.mark.parametrize("temperature", ["inf", "1e-40", "1e-5"])
def test_an_infinite_or_vanishing_sampling_temperature_is_refused(qwen2_dir, capsys, temperature):
    # 1e-40 overflowed the scaled logits: the model was blamed for the NaN log-probs.
    code, err = cli_error(["generate", "--model", str(qwen2_dir), "--prompt", "hi", "--temperature", temperature],
                          capsys)
    assert (code, err) == (2, f"fusedrl generate: --temperature={float(temperature)!r} is invalid: expected 0 "
                              "(greedy) or a finite number >= 0.0001\n")


@pytest.mark.parametrize("command, option, message", [
    ("grpo", "rollout.temperature=1e-45", "rollout.temperature must be a finite number >= 0.0001 (a smaller one is "
                                          "greedy in all but name and overflows the scaled logits), got 1e-45"),
    ("distill", "distill.temperature=1e-9", "distill.temperature must be a finite number >= 0.0001, got 1e-09"),
    ("grpo", "reward.kl_ceiling=-1", "reward.kl_ceiling must be a finite number > 0 or null (off), got -1.0"),
    ("grpo", "reward.kl_ceiling=0", "reward.kl_ceiling must be a finite number > 0 or null (off), got 0.0"),
    ("grpo", "optim.weight_decay=-0.1", "optim.weight_decay must be >= 0, got -0.1"),
    ("grpo", "optim.eps=0", "optim.eps must be > 0, got 0.0"),
    ("grpo", "optim.beta1=1", "optim.beta1 must be in [0, 1), got 1.0"),
    ("grpo", "optim.beta2=-0.5", "optim.beta2 must be in [0, 1), got -0.5"),
    ("grpo", "ppo.epochs=0", "ppo.epochs must be >= 1, got 0"),
    ("grpo", "ppo.minibatch_size=0", "ppo.minibatch_size must be >= 1, got 0"),
    ("grpo", "ppo.gamma=1.5", "ppo.gamma must be in [0, 1], got 1.5"),
    ("grpo", "ppo.lam=-1", "ppo.lam must be in [0, 1], got -1.0"),
    ("grpo", "rollout.top_k=-1", "rollout.top_k must be >= 0 (0 = off), got -1"),
    ("grpo", "rollout.top_p=0", "rollout.top_p must be in (0, 1], got 0.0"),
    ("grpo", "rollout.speculative_tokens=-2", "rollout.speculative_tokens must be >= 0, got -2"),
    ("grpo", "train.log_every=0", "train.log_every must be >= 1, got 0"),
    ("grpo", "train.keep_checkpoints=-1", "train.keep_checkpoints must be >= 0, got -1"),
    ("sft", "train.eval_every=-1", "train.eval_every must be >= 0, got -1"),
])
def test_an_out_of_range_option_is_refused_by_its_key_and_value_before_any_work(command, option, message,
                                                                                 tmp_path, capsys, monkeypatch):
    """Each refusal names the one key that failed and its value, from the config alone: nothing is
    loaded and no run directory is made (a KL ceiling <= 0 used to stop the run after its first
    rollout)."""
    monkeypatch.chdir(tmp_path)
    required = {"grpo": RL_REQUIRED, "distill": ["policy=p", "teacher=t", "prompts_file=f", "output_dir=o"],
                "sft": ["model=m", "output_dir=o", "data.train_file=t"]}[command]
    code, err = cli_error([command, *required, option], capsys)
    assert (code, err) == (2, f"fusedrl {command}: {message}\n")
    assert list(tmp_path.iterdir()) == []


def test_an_infinite_option_is_one_line_before_the_paths_are_checked(tmp_path, capsys):
    code, err = cli_error(["sft", f"model={tmp_path}", f"output_dir={tmp_path / 'o'}", "data.train_file=t",
                           "optim.weight_decay=.inf"], capsys)
    assert (code, err) == (2, "fusedrl sft: optim.weight_decay must be a finite number, got inf\n")


def test_malformed_config_files_and_values_are_one_line(tmp_path, capsys):
    as_list = tmp_path / "list.yaml"
    as_list.write_text("- model: m\n- output_dir: o\n")
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 20000 + "]" * 20000)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("model: m\noutput_dir: caf\u00e9\n".encode("latin-1"))
    twice = tmp_path / "twice.yaml"  # YAML itself keeps the last in silence
    twice.write_text("model: m\noptim:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    for argv, message in [
        (["--config", str(twice)], f"{twice}: not valid YAML: line 4: key 'lr' written twice in one "
                                   "mapping\n"),
        (["--config", str(latin1)], f"{latin1}:2: not valid UTF-8 (byte 0xe9 at column 16); a config file is UTF-8 "
                                    "text\n"),
        (["--config", str(as_list)], f"{as_list}: expected a mapping of keys (key: value lines), got a YAML list"),
        (["--config", str(deep)], f"{deep}: nested too deeply to be a config"),
        (["optim.lr=" + "[" * 20000], "override optim.lr: nested too deeply to be a config"),
        (["optim.lr=["], "override optim.lr: not valid YAML"),
    ]:
        code, err = cli_error(["sft", *argv], capsys)
        assert code == 2 and err.startswith(f"fusedrl sft: {message}") and err.count("\n") == 1, err


def test_deep_json_and_impossible_model_sizes_are_one_line(qwen2_dir, tmp_path, capsys):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"prompt": ' + "[" * 100000 + "]" * 100000 + "}\n")
    code, err = cli_error(["sft", f"model={qwen2_dir}", f"output_dir={tmp_path / 'run'}", f"data.train_file={deep}",
                           "data.max_length=64", "data.max_prompt_length=32", "train.device=cpu"], capsys)
    assert (code, err) == (1, f"fusedrl sft: {deep}:1: JSON nested too deeply\n")
    config = json.loads((qwen2_dir / "config.json").read_text())
    for key, value, says in [("hidden_size", -64, "hidden_size=-64 must be an int in [1, 2147483647]"),
                             ("vocab_size", 10**13, "vocab_size=10000000000000 must be an int in [1, 2147483647]"),
                             ("num_attention_heads", 0, "num_attention_heads=0 must be an int"),
                             ("rms_norm_eps", -1.0, "rms_norm_eps=-1.0 must be a finite number > 0")]:
        model = tmp_path / f"model-{key}"
        shutil.copytree(qwen2_dir, model)
        (model / "config.json").write_text(json.dumps({**config, key: value}))
        code, err = cli_error(["generate", "--model", str(model), "--prompt", "hi", "--no-progress"], capsys)
        assert (code, err) == (1, f"fusedrl generate: {model}: config.json: {says}\n") or (
            code == 1 and says in err and err.count("\n") == 1), err
    (model / "config.json").write_text('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    code, err = cli_error(["generate", "--model", str(model), "--prompt", "hi"], capsys)
    assert code == 1 and "not a readable model config" in err and err.count("\n") == 1, err


def test_a_resumed_run_applies_or_refuses_each_changed_option(qwen2_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", demonstrations(4))
    run = tmp_path / "run"
    sft = ["sft", f"model={qwen2_dir}", f"output_dir={run}", f"data.train_file={data}", "data.max_length=64",
           "data.max_prompt_length=32", "data.eval_fraction=0", "train.device=cpu", "train.progress=false",
           "train.save_every=1", "train.keep_checkpoints=0"]
    assert cli.main([*sft, "train.max_steps=1"]) == 0
    capsys.readouterr()
    # Applied: a new peak lr and a longer run, from the saved step on, and recorded in config.yaml.
    code, err = cli_error([*sft, "train.max_steps=2", "optim.lr=0.5"], capsys)
    assert code == 0, err
    assert "resumed with train.max_steps=2 (was 1)" in err and "resumed with optim.lr=0.5 (was 1e-05)" in err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.5 and saved["train"]["max_steps"] == 2
    step2 = [r for r in read_metrics(run) if r["kind"] == "train" and r["step"] == 2]
    assert step2 and step2[-1]["lr"] == pytest.approx(0.5 * 0.1)  # the new peak at the cosine's end (min_lr_ratio)
    # Refused: what the checkpoint was trained with, in one line naming both values; nothing rewritten.
    before = (run / "config.yaml").read_text()
    code, err = cli_error([*sft, "train.max_steps=3", "optim.lr=0.5", "lora.rank=4", "optim.beta2=0.9"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"fusedrl sft: optim.beta2=0.9 but the run in {run} was trained with optim.beta2=0.95 "
                          "(its config.yaml) (also changed: lora.rank): a resumed run cannot change it"), err
    assert (run / "config.yaml").read_text() == before
    assert not (run / "checkpoints" / "step-00000003").exists()
