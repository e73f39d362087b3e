"""The `fusedrl` command line."""
import json
import os
import subprocess
import sys

import pytest

from fusedrl.engine import cli
from fusedrl.engine.cli import process
from cli_testing import cli_error


def test_info_reports_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "cpu: ops run on '" in out


def test_the_command_sets_the_cpu_wait_policy_before_torch_and_keeps_the_users():
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    info = subprocess.run([sys.executable, "-m", "fusedrl.engine.cli", "info"], capture_output=True,
                          text=True, env=environ, check=True).stdout
    assert "torch threads, OMP_WAIT_POLICY=PASSIVE\n" in info, info
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert process.set_cpu_defaults(mine) == {} and mine == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert process.set_cpu_defaults({}) == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_unknown_command_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train-everything"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# Help, config errors and wrong paths of every command.
TORCH_FREE_ARGVS = [["--help"], ["sft", "--help"], ["rm", "--help"], ["ppo", "--help"], ["demo", "--help"],
                    ["generate", "--help"], ["plot", "--help"],
                    ["sft", "model=m", "output_dir=o", "data.train_file=t", "optim.lrr=1"],
                    ["sft", "model=/nonexistent", "output_dir=o", "data.train_file=t"],
                    ["ppo", "policy=/nonexistent", "prompts_file=f", "output_dir=o"],
                    ["generate", "--model", "/nonexistent", "--prompt", "hi"],
                    ["plot", "/nonexistent"], ["plan", "--help"],
                    ["plan", "ppo", "policy=/nonexistent", "--gpus", "8", "lora.rank=8"]]


def test_parsing_imports_neither_torch_nor_transformers():
    """Help, config errors and wrong paths come from torch-free code alone, so they are answered at
    once. One fresh interpreter (nothing this test process imported counts) runs every command line
    in turn and lists what is loaded after each: the first to import one of them is named."""
    code = ("import json, sys\nfrom fusedrl.engine import cli\n"
            # the Python API's names too: importing them must stay as light
            "from fusedrl.engine import SFTConfig, RMConfig, PPOConfig, GRPOConfig, run_sft, "
            "run_rm, run_ppo, run_grpo\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "    print('loaded', sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(TORCH_FREE_ARGVS)], capture_output=True, text=True,
                         check=True).stdout
    loaded = [line for line in out.splitlines() if line.startswith("loaded ")]
    assert len(loaded) == len(TORCH_FREE_ARGVS), out
    for argv, line in zip(TORCH_FREE_ARGVS, loaded):
        assert line == "loaded []", f"{argv} imported {line[len('loaded '):]}"


def test_config_error_names_the_key_and_the_closest_one(capsys):
    code, err = cli_error(["sft", "model=m", "output_dir=o", "data.train_file=t", "optim.lrr=1"], capsys)
    assert code == 2 and err.startswith("fusedrl sft: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)")


@pytest.mark.parametrize("command, key, ours", [
    ("sft", "optim.learning_rate", "optim.lr"), ("sft", "learning_rate", "optim.lr"),
    ("sft", "gradient_accumulation_steps", "optim.grad_accum_steps"), ("rm", "num_train_epochs", "train.epochs"),
    ("sft", "optim.max_grad_norm_", "optim.max_grad_norm"), ("sft", "max_grad_norm", "optim.max_grad_norm"),
    ("sft", "warmup_steps", "optim.warmup_steps"), ("sft", "per_device_train_batch_size", "data.tokens_per_batch"),
    ("ppo", "per_device_train_batch_size", "ppo.minibatch_size"), ("grpo", "num_generations",
                                                                   "rollout.samples_per_prompt")])
def test_names_from_transformers_trl_and_torchtune_suggest_ours(command, key, ours, capsys):
    required = {"sft": ["model=m", "output_dir=o", "data.train_file=t"], "rm": ["model=m", "output_dir=o", "data.train_file=t"],
                "ppo": ["policy=p", "prompts_file=f", "output_dir=o"], "grpo": ["policy=p", "prompts_file=f", "output_dir=o"]}
    code, err = cli_error([command, *required[command], f"{key}=1"], capsys)
    assert code == 2 and err.startswith(f"fusedrl {command}: unknown config key '{key}' (did you mean '{ours}'?"), err


def test_enum_like_option_lists_its_choices(capsys):
    code, err = cli_error(["ppo", "policy=p", "prompts_file=f", "output_dir=o", "ppo.agg=token-man"], capsys)
    assert code == 2 and err.startswith("fusedrl ppo: ppo.agg: expected one of ('token-mean', ")
    assert err.endswith("got 'token-man' (did you mean 'token-mean'?)\n")
