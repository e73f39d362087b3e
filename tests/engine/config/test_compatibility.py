"""The compatibility table (engine/config/compatibility.py): every pair of rollout and training
options is either accepted by the config or refused in one line naming both, exactly as the table
says; the mixture-of-experts pairs wait for the policy's config (moe=True)."""
import dataclasses
import itertools

import pytest

from fusedrl.engine.config.compatibility import INCOMPATIBLE, MOE, refuse_incompatible
from fusedrl.engine.config.ppo import GRPOConfig, PPOConfig
from fusedrl.engine.errors import UsageError

# One value that turns each option on (a group estimator is GRPO's default; gae asks for a critic).
SETTINGS = {
    "rollout.partial_rollouts": True,
    "rollout.dynamic_sampling": True,
    "rollout.exact": True,
    "rollout.tools": ["agent_testing:add"],
    "rollout.environment": "agent_testing:CountdownEnv",
    "rollout.speculative_tokens": 2,
    "rollout.prefill_chunk": 8,
    "rollout.overlong_buffer": 4,
    "rollout.routing_replay": True,
    "train.prefix_sharing": True,
    "lora.dropout": 0.1,
    "ppo.estimator": "gae",
    "ppo.turn_advantages": True,
    "reward.per_turn": True,
    "reward.normalize": True,
    "reward.clip": 5.0,
}


def config(settings: dict) -> PPOConfig:
    """A GRPO config with `settings` (dotted keys) on; what they need to be read goes beside them
    (lora.rank with lora.dropout, a critic with gae, reward.per_turn under ppo.turn_advantages and
    an environment under reward.per_turn)."""
    data = {"policy": "p", "prompts_file": "x.jsonl", "output_dir": "o", "reward_fn": "m:f",
            "rollout": {"max_new_tokens": 16}}
    wanted = dict(settings)
    if "lora.dropout" in wanted:
        wanted["lora.rank"] = 4
    if wanted.get("ppo.estimator") == "gae":
        data["critic"] = "separate"
    if "ppo.turn_advantages" in wanted:
        wanted.setdefault("reward.per_turn", True)
    if "reward.per_turn" in wanted and not {"rollout.tools", "rollout.environment"} & set(wanted):
        wanted["rollout.environment"] = SETTINGS["rollout.environment"]
    for key, value in wanted.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    return GRPOConfig.from_dict(data)


def implied(settings: dict) -> set:
    """The options config(settings) turns on (rollout.routing_replay is on by default)."""
    keys = set(settings) | {"rollout.routing_replay"}
    if "ppo.turn_advantages" in keys:
        keys.add("reward.per_turn")
    if "reward.per_turn" in keys and not {"rollout.tools", "rollout.environment"} & keys:
        keys.add("rollout.environment")
    return keys


def pairs_within(keys: set, moe: bool) -> list:
    """The table's pairs both of whose options are among `keys` (the MoE ones only with moe)."""
    return [p for p in INCOMPATIBLE if ({p.first, p.second} - {MOE} <= keys
                                        and (moe or not (p.moe or MOE in (p.first, p.second))))]


def assert_refused_by(error: Exception, pair) -> None:
    message = str(error)
    assert isinstance(error, UsageError) and "\n" not in message, message
    for key in (pair.first, pair.second):
        assert (key if key != MOE else "mixture-of-experts policy") in message, (pair, message)


@pytest.mark.parametrize("first,second", list(itertools.combinations(SETTINGS, 2)))
def test_every_pair_is_accepted_or_refused_in_one_line_naming_both(first, second):
    """Without knowing the policy the config refuses exactly the table's pairs; with an MoE
    policy the run's start refuses its pairs too."""
    keys = implied({first: None, second: None})
    refused = pairs_within(keys, moe=False)
    if refused:
        with pytest.raises(ValueError) as e:
            config({first: SETTINGS[first], second: SETTINGS[second]})
        assert_refused_by(e.value, refused[0])
        return
    cfg = config({first: SETTINGS[first], second: SETTINGS[second]})
    refused = pairs_within(keys, moe=True)
    if refused:
        with pytest.raises(ValueError) as e:
            refuse_incompatible(cfg, moe=True)
        assert_refused_by(e.value, refused[0])
        off = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout,
                                                                   routing_replay=False))
        if all(p.first == "rollout.routing_replay" for p in refused):
            refuse_incompatible(off, moe=True)  # the replay's pairs go with it off
    else:
        refuse_incompatible(cfg, moe=True)


def test_every_pair_of_the_table_is_reached_by_the_walk():
    # Each pair's options are ones the walk turns on: no row of the table goes untested.
    for pair in INCOMPATIBLE:
        assert {pair.first, pair.second} - {MOE} <= set(SETTINGS), pair


@pytest.mark.parametrize("key", list(SETTINGS))
def test_one_option_alone_is_refused_only_beside_a_mixture_of_experts_policy(key):
    cfg = config({key: SETTINGS[key]})
    refused = pairs_within(implied({key: None}), moe=True)
    if refused:
        with pytest.raises(ValueError) as e:
            refuse_incompatible(cfg, moe=True)
        assert_refused_by(e.value, refused[0])
    else:
        refuse_incompatible(cfg, moe=True)
