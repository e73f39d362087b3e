"""PPO under bad rewards and bad prompts: non-finite scores drop their rows and never reach the
running moments, the KL controller or the ceiling; all-dropped iterations are skipped until the
run stops; a failing reward function is named; long prompts are caught when loaded."""
import math
import sys

import pytest
import torch

from fusedrl.engine.data.prompts import load_prompts
from fusedrl.engine.data.records import DataError
from fusedrl.engine.errors import UsageError
from fusedrl.engine.config.ppo import LoopConfig, RewardConfig, RolloutConfig
from fusedrl.engine.stages.ppo import trainer
from fusedrl.engine.stages.ppo.advantages import KLController, RunningMoments, finite_rows
from fusedrl.engine.stages.ppo.trainer import KLCeilingExceeded, check_kl, train_ppo
from fusedrl.engine.stages.rewards.functions import RewardFunctionError, load_function, source_of
from fusedrl.engine.train.loop import Diverged
from fusedrl.engine.train.runlog import read_metrics
from test_ppo import config, setup, vowel_fraction  # noqa: F401  (setup is a fixture)
from train_testing import checkpoint_data, write_jsonl


def test_finite_rows_drop_rows_or_whole_groups():
    scores = torch.tensor([1.0, float("nan"), 2.0, 3.0, float("inf"), 4.0])
    finite = torch.isfinite(scores).tolist()
    assert finite_rows(finite) == [0, 2, 3, 5]
    assert finite_rows(finite, group_size=3) == []
    assert finite_rows(finite, group_size=2) == [2, 3]


def test_moments_kl_controller_and_ceiling_never_take_a_non_finite_value():
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, float("nan"), 3.0, float("-inf")]))
    assert (moments.count, moments.mean, moments.std) == (2, 2.0, 1.0)
    kl = KLController(0.1, target=1.0, horizon=10)
    assert kl.update(float("nan"), 4) == 0.1 and math.isfinite(kl.update(2.0, 4))
    with pytest.raises(KLCeilingExceeded, match="KL to the reference is nan"):
        check_kl(float("nan"), None, 3)
    with pytest.raises(KLCeilingExceeded, match="exceeds reward.kl_ceiling=0.5"):
        check_kl(0.6, 0.5, 3)
    check_kl(0.4, 0.5, 3)


def nan_first_inf_last(prompts, responses):
    scores = vowel_fraction(prompts, responses)
    return [float("nan")] + scores[1:-1] + [float("inf")]


def test_non_finite_scores_drop_their_rows_and_the_run_goes_on(setup):
    root, policy_dir, prompts = setup
    # In this process (reward.isolation=thread): this module is the function's, and imports torch.
    cfg = config(root, policy_dir, prompts, "nan-rows",
                 reward=RewardConfig(normalize=True, isolation="thread"),
                 train=LoopConfig(iterations=1, progress=False, device="cpu"))
    train_ppo(cfg, reward_fn=nan_first_inf_last)
    train = [r for r in read_metrics(root / "nan-rows") if r["kind"] == "train"]
    assert [r["dropped_rows"] for r in train] == [2] and train[0]["updates"] > 0
    assert math.isfinite(train[0]["score_mean"]) and math.isfinite(train[0]["kl"])
    moments = checkpoint_data(root / "nan-rows" / "checkpoints" / "step-00000001")["loop"]["moments"]
    assert moments["count"] == 6 - 2 and math.isfinite(moments["mean"]) and math.isfinite(moments["m2"])


def test_iterations_without_a_finite_score_are_skipped_until_the_run_stops(setup, capsys):
    root, policy_dir, prompts = setup
    cfg = config(root, policy_dir, prompts, "all-inf", reward=RewardConfig(isolation="thread"),
                 train=LoopConfig(iterations=5, max_consecutive_skips=2, progress=False, device="cpu"))
    with pytest.raises(Diverged, match=r"stopped at step 2: 2 steps in a row could not update "
                                       r"\(last: all 6 scores were NaN or inf\)"):
        train_ppo(cfg, reward_fn=lambda prompts, responses: [math.inf] * len(responses))
    assert "step 1: no update (all 6 scores were NaN or inf)" in capsys.readouterr().err
    assert not (root / "all-inf" / "final").exists()


def test_a_reward_function_that_raises_is_named(setup):
    root, policy_dir, prompts = setup

    def flaky_reward(prompts, responses):
        raise ZeroDivisionError("boom")
    with pytest.raises(RewardFunctionError, match=r"the reward function .*flaky_reward raised ZeroDivisionError: boom"):
        train_ppo(config(root, policy_dir, prompts, "raises", reward_fn=None,
                         reward=RewardConfig(isolation="thread")), reward_fn=flaky_reward)


def test_reward_fn_modules_resolve_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text("def score(prompts, responses):\n    return [1.0] * len(responses)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_reward", raising=False)
    source = source_of("my_reward:score")
    monkeypatch.chdir("/")  # the directory is the one the run started in
    assert load_function(source)([], ["a", "b"]) == [1.0, 1.0]
    with pytest.raises(UsageError, match=r"my_reward.py has no function 'scor'"):
        load_function(source_of("my_reward:scor"))
    with pytest.raises(UsageError, match=r"cannot import 'no_such_module'.*the run started in"):
        load_function(source_of("no_such_module:score"))
    with pytest.raises(UsageError, match="expected 'module:function'"):
        source_of("my_reward")


def test_a_prompt_without_room_to_generate_is_caught_at_load_before_any_model(setup, monkeypatch):
    root, policy_dir, _ = setup
    long = "hello world the quick brown fox " * 40  # > 128 tokens: the tiny model's context
    prompts = write_jsonl(root / "long.jsonl", [{"prompt": "hello"}, {"prompt": long}])
    monkeypatch.setattr(trainer, "build_models", lambda *a: pytest.fail("a model was built"))
    with pytest.raises(DataError, match=r"long\.jsonl:2: the prompt has 256 tokens, which leaves no room to "
                                        r"generate within the model's context of 128; .*rollout.truncate_prompts"):
        train_ppo(config(root, policy_dir, prompts, "long"))
    from transformers import AutoTokenizer
    rows, truncated = load_prompts(prompts, AutoTokenizer.from_pretrained(policy_dir), 256, 128,
                                   truncate_to_context=True)
    assert truncated == 1 and [len(p.ids) for p in rows][1] == 127
    assert RolloutConfig(truncate_prompts=True).truncate_prompts
