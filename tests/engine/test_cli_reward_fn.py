"""A user's reward function cannot end, stall or fool a run: an exception (SystemExit included), a
hang past reward.fn_timeout_s and a return value that is not one number per response each fail the
run with exit 1 and one line naming the function. The hang runs in a real `fusedrl grpo` process
(the hung thread must not keep it alive; its module found in the current directory); the other
failures call the same command in this process (`cli.main`, which prints the same line)."""
import math
import sys

import pytest

from fusedrl.engine.stages.rewards.functions import RewardFunctionError, call_reward_fn, checked_scores
from cli_testing import assert_one_line_error, cli_error, run_fusedrl
from train_testing import write_jsonl

HANGS = '''
import time

def hangs(prompts, responses):
    time.sleep(3600)
'''


def exits(prompts, responses):
    sys.exit(0)


def raises(prompts, responses):
    raise ValueError("bad answer format")


def interrupts(prompts, responses):
    raise KeyboardInterrupt


def text(prompts, responses):
    return "1.0"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory holding the reward module `user_rewards` and a prompts file (the runs' cwd)."""
    root = tmp_path_factory.mktemp("rewards")
    (root / "user_rewards.py").write_text(HANGS)
    write_jsonl(root / "prompts.jsonl", [{"prompt": "hello world"}, {"prompt": "the lazy dog"}])
    return root


def grpo(workdir, policy, reward_fn, *extra):
    """The argv of a one-iteration `fusedrl grpo` run of two responses scored by `reward_fn`."""
    out = workdir / reward_fn.partition(":")[2]
    return ["grpo", f"policy={policy}", f"output_dir={out}", f"prompts_file={workdir / 'prompts.jsonl'}",
            f"reward_fn={reward_fn}", "train.device=cpu", "train.progress=false", "train.iterations=1",
            "rollout.max_new_tokens=2", "rollout.prompts_per_iteration=1", "rollout.samples_per_prompt=2", *extra]


@pytest.mark.parametrize("fn, says", [
    ("exits", "raised SystemExit: 0"),
    ("raises", "raised ValueError: bad answer format"),
    ("interrupts", "raised KeyboardInterrupt"),
    ("text", "returned str '1.0': expected a list of 2 numbers"),
])
def test_a_failing_reward_function_fails_the_run_in_one_line(workdir, qwen2_dir, fn, says, capsys):
    code, err = cli_error(grpo(workdir, qwen2_dir, f"test_cli_reward_fn:{fn}"), capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"fusedrl grpo: the reward function test_cli_reward_fn:{fn} {says}"), err
    assert not (workdir / fn / "final").exists()


def test_a_hanging_reward_function_fails_the_process_after_its_timeout(workdir, qwen2_dir):
    # The hang would take an hour: the process ends although the function's thread still sleeps.
    result = run_fusedrl(*grpo(workdir, qwen2_dir, "user_rewards:hangs", "reward.fn_timeout_s=0.5"),
                         cwd=workdir, timeout=180)
    assert_one_line_error(result, 1, "fusedrl grpo: the reward function user_rewards:hangs did not return within "
                                     "reward.fn_timeout_s=0.5 seconds")


def test_return_values_are_checked_not_coerced():
    assert checked_scores([1, 0.5, math.nan], "f", 3)[:2] == [1.0, 0.5]  # NaN rows are the rollout's to drop
    refused = [("0.5", "returned str '0.5'"), (None, "returned NoneType None"),
               ((s for s in [1.0]), "returned generator"), ([1.0, 2.0], "returned 2 scores for 1 responses"),
               (["1.0"], "returned str '1.0' as score 0"), ([True], "returned bool True as score 0")]
    for value, message in refused:  # each for one response
        with pytest.raises(RewardFunctionError, match=message):
            checked_scores(value, "f", 1)
    with pytest.raises(RewardFunctionError, match="returned Tensor"):
        call_reward_fn(lambda p, r: __import__("torch").ones(len(r)), "f", ["p"], ["r"], 10)
    assert call_reward_fn(lambda p, r: [len(x) for x in r], "f", ["p", "q"], ["ab", "c"], 10) == [2.0, 1.0]


def test_a_real_ctrl_c_still_stops_the_call():
    """KeyboardInterrupt in the waiting (main) thread propagates: only the function's own is contained."""
    import _thread
    import threading

    interrupted = threading.Event()

    def ctrl_c():  # the main thread sees it when its join returns: the function returns right after
        _thread.interrupt_main()
        interrupted.set()

    threading.Timer(0.2, ctrl_c).start()
    with pytest.raises(KeyboardInterrupt):
        call_reward_fn(lambda p, r: interrupted.wait(30), "f", ["p"], ["r"], 60)


def test_the_function_runs_under_the_callers_grad_mode():
    import torch

    with torch.no_grad():
        assert call_reward_fn(lambda p, r: [float(torch.is_grad_enabled())], "f", ["p"], ["r"], 10) == [0.0]
    assert call_reward_fn(lambda p, r: [float(torch.is_grad_enabled())], "f", ["p"], ["r"], 10) == [1.0]
