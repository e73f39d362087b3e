"""A user's reward functions through `fusedrl grpo`, each in its worker process: two TRL-style
functions with weights are both named in metrics.jsonl; whatever a function does is the run's
failure in one line with exit 1 (an exception, SystemExit and KeyboardInterrupt included, a bad
return value, `os._exit(0)`, a GIL-holding regex past reward.fn_timeout_s); its chdir moves
nothing. The GIL holder runs in a real `fusedrl grpo` process; the others call the same command in
this process (`cli.main`, which prints the same line; the worker processes are real)."""
import json
import os

import pytest

from fusedrl.engine.config import io as config_io
from fusedrl.engine.config.ppo import GRPOConfig
from cli_testing import assert_one_line_error, cli_error, run_fusedrl
from train_testing import write_jsonl

pytestmark = pytest.mark.integration

USER_REWARDS = '''
import os, re, sys

def exits(prompts, responses):
    sys.exit(0)

def raises(prompts, responses):
    raise ValueError("bad answer format")

def interrupts(prompts, responses):
    raise KeyboardInterrupt

def text(prompts, responses):
    return "1.0"

def quits(prompts, responses):
    os._exit(0)

def backtracks(prompts, responses):
    """Catastrophic backtracking in C, holding the GIL for ever."""
    return [float(bool(re.match(r"(a+)+$", "a" * 64 + "b")))] * len(responses)

def moves(prompts, responses):
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "elsewhere"))
    return [0.0] * len(responses)

def length(prompts, completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]

def vowels(prompts, completions, **kwargs):
    return [float(sum(ch in "aeiou" for ch in c)) for c in completions]
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The runs' directory: the module `user_rewards`, a prompts file and an empty `elsewhere/`."""
    root = tmp_path_factory.mktemp("rewards")
    (root / "user_rewards.py").write_text(USER_REWARDS)
    (root / "elsewhere").mkdir()
    write_jsonl(root / "prompts.jsonl", [{"prompt": "hello world"}, {"prompt": "the lazy dog"}])
    return root


def grpo(workdir, policy, reward_fn, out, *extra):
    """The argv of a one-iteration `fusedrl grpo` run of two responses scored by `reward_fn`."""
    return ["grpo", f"policy={policy}", f"output_dir={out}",
            f"prompts_file={workdir / 'prompts.jsonl'}",
            f"reward_fn={reward_fn}", "train.device=cpu", "train.progress=false",
            "train.iterations=1", "rollout.max_new_tokens=2", "rollout.prompts_per_iteration=1",
            "rollout.samples_per_prompt=2", *extra]


def test_two_weighted_trl_functions_are_both_in_the_metrics(workdir, qwen2_dir, capsys,
                                                            monkeypatch):
    monkeypatch.chdir(workdir)
    out = workdir / "weighted"
    argv = grpo(workdir, qwen2_dir, "user_rewards:length,user_rewards:vowels", out,
                "reward.weights=1,0.5")
    assert cli_error(argv, capsys)[0] == 0
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    length, vowels, total = (row[f"rewards/{name}/mean"] for name in ("length", "vowels", "total"))
    assert 0 < length <= 2 and row["rewards/vowels/std"] >= 0
    assert total == pytest.approx(length + 0.5 * vowels)
    assert row["score_mean"] == pytest.approx(total)


@pytest.mark.parametrize("fn, says", [
    ("exits", "raised SystemExit: 0"),
    ("raises", "raised ValueError: bad answer format"),
    ("interrupts", "raised KeyboardInterrupt"),
    ("text", "returned str '1.0': expected a list of 2 numbers"),
    ("quits", "ended its worker process (exit code 0) while scoring 2 responses"),
])
def test_a_failing_reward_function_fails_the_run_in_one_line(workdir, qwen2_dir, fn, says, capsys,
                                                             monkeypatch):
    monkeypatch.chdir(workdir)
    code, err = cli_error(grpo(workdir, qwen2_dir, f"user_rewards:{fn}", workdir / fn), capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"fusedrl grpo: the reward function user_rewards:{fn} {says}"), err
    assert not (workdir / fn / "final").exists()


def test_a_reward_function_changing_directory_moves_nothing(workdir, qwen2_dir, capsys,
                                                            monkeypatch):
    monkeypatch.chdir(workdir)
    assert cli_error(grpo(workdir, qwen2_dir, "user_rewards:moves", "moved"), capsys)[0] == 0
    assert os.getcwd() == str(workdir) and (workdir / "moved" / "final").is_dir()
    assert list((workdir / "elsewhere").iterdir()) == []


def test_a_gil_holding_reward_function_fails_the_process_at_its_timeout(workdir, qwen2_dir):
    # The regex would run for centuries, holding the GIL: only killing its process ends it.
    result = run_fusedrl(*grpo(workdir, qwen2_dir, "user_rewards:backtracks", workdir / "gil",
                               "reward.fn_timeout_s=1"), cwd=workdir, timeout=180)
    assert_one_line_error(result, 1, "fusedrl grpo: the reward function user_rewards:backtracks "
                                     "did not return within reward.fn_timeout_s=1 seconds")


def test_reward_options_from_the_command_line_and_yaml(tmp_path):
    required = {"policy": "p", "prompts_file": "f", "output_dir": "o"}
    cfg = config_io.load(GRPOConfig, None, [f"{k}={v}" for k, v in required.items()] +
                         ["reward_fn=a:f, b.py:g", "reward.weights=1,0.5"])
    assert cfg.reward_fns() == ["a:f", "b.py:g"] and cfg.reward.weights == [1.0, 0.5]
    (tmp_path / "c.yaml").write_text("reward_fn: [a:f, b:g]\n"
                                     "reward:\n  weights: [2, 1]\n  isolation: thread\n")
    cfg = config_io.load(GRPOConfig, tmp_path / "c.yaml", [f"{k}={v}" for k, v in required.items()])
    assert cfg.reward_fns() == ["a:f", "b:g"] and cfg.reward.weights == [2.0, 1.0]
    # One function's one weight needs no list: a lone number is a list of one, from YAML too.
    for override in ("reward.weights=1.0", "reward.weights=2", "reward.weights=1.0e-1"):
        cfg = config_io.load(GRPOConfig, None, [f"{k}={v}" for k, v in required.items()]
                             + ["reward_fn=a:f", override])
        assert cfg.reward.weights == [float(override.partition("=")[2])]
    (tmp_path / "one.yaml").write_text("reward_fn: a:f\nreward:\n  weights: 0.5\n")
    cfg = config_io.load(GRPOConfig, tmp_path / "one.yaml", [f"{k}={v}" for k, v in required.items()])
    assert cfg.reward.weights == [0.5]
    refused = [("reward.weights=[1]", r"reward.weights has 1 weight\(s\) for 2 reward function"),
               ("reward.weights=1,x", r"reward.weights\[1\]: expected float"),
               ("reward.weights=true", r"reward.weights: expected a list \(or comma-separated text\), "
                                       "got True"),
               ("reward.weights=1.0", r"reward.weights has 1 weight\(s\) for 2 reward function"),
               ("reward.isolation=fork", "expected one of \\('process', 'thread'\\)")]
    for override, message in refused:
        with pytest.raises(ValueError, match=message):
            config_io.load(GRPOConfig, tmp_path / "c.yaml",
                           [f"{k}={v}" for k, v in required.items()] + [override])


@pytest.mark.parametrize("command, stage", [("grpo", "GRPO"), ("ppo", "PPO")])
def test_a_run_without_a_reward_names_the_command_run(workdir, qwen2_dir, tmp_path, capsys, command,
                                                      stage):
    argv = [command, f"policy={qwen2_dir}", f"output_dir={tmp_path / 'run'}",
            f"prompts_file={workdir / 'prompts.jsonl'}", "train.device=cpu"]
    code, err = cli_error(argv, capsys)
    assert (code, err) == (2, f"fusedrl {command}: {stage} needs a reward: set reward_model, "
                              "reward_fn or rollout.environment (or pass reward_fn=...)\n")
