"""What a run says about its scores: a finite score beyond float32's range is named as such (not
as a NaN or inf it would become), one NaN that drops its group is counted as one, and a reward
timeout is bounded where it is set."""
import math

import pytest
import torch

from fusedrl.engine.config.ppo import RewardConfig
from fusedrl.engine.model.hf_io import load_tokenizer
from fusedrl.engine.stages.ppo.experience import non_finite_reason
from fusedrl.engine.stages.rollout.reward_scores import FunctionScorer
from fusedrl.engine.stages.rewards.combined import open_reward_functions
from fusedrl.engine.stages.rewards.functions import RewardFunctionError


def scorer(qwen2_dir, scores):
    """A reward function returning `scores`, as the rollout calls it (decoded texts, checked)."""
    def returns(prompts, responses):
        return scores
    functions = open_reward_functions([returns], None, "thread", 5.0)
    return FunctionScorer(functions, load_tokenizer(qwen2_dir))


def test_a_finite_score_beyond_float32_is_named_not_called_nan(qwen2_dir):
    huge = scorer(qwen2_dir, [1.0, 1e308])
    message = r"the reward function .*returns returned 1e\+308 as score 1: finite, but beyond"
    with pytest.raises(RewardFunctionError, match=message):
        huge([[1, 2], [1, 2]], [[3], [4]])
    values = scorer(qwen2_dir, [-3e38, math.nan])([[1], [1]], [[3], [4]])
    assert values[0] == torch.tensor(-3e38) and values[1].isnan()  # a NaN stays one: row dropped


def test_one_nan_dropping_its_group_is_counted_as_one():
    assert non_finite_reason(torch.tensor([1.0, math.nan]), group=2) == (
        "1 of 2 scores was NaN or inf, and each drops its whole group of 2 (the group estimator's "
        "baseline needs every score): no group was left")
    both = torch.tensor([math.inf, math.nan])
    assert non_finite_reason(both, group=2) == "all 2 scores were NaN or inf"
    three = torch.tensor([math.inf, math.nan, 1.0, math.nan])
    assert non_finite_reason(three, group=2).startswith("3 of 4 scores were")


def test_reward_timeout_is_bounded_in_the_config():
    assert RewardConfig(fn_timeout_s=3600.0).fn_timeout_s == 3600.0
    with pytest.raises(ValueError, match=r"reward.fn_timeout_s must be in \(0, 1e\+06\] seconds, "
                                         r"got 1e\+300"):
        RewardConfig(fn_timeout_s=1e300)
