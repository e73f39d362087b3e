"""The compatibility table (engine/config/compatibility.py): every pair of rollout, training and
parallel options is either accepted by the config or refused in one line naming both, exactly as
the table says; the mixture-of-experts pairs wait for the policy's config (moe=True)."""
import dataclasses
import itertools
from pathlib import Path

import pytest

from fusedrl.engine.config.compatibility import (INCOMPATIBLE, MOE, markdown_table, refuse_incompatible,
                                                table_lines)
from fusedrl.engine.config.ppo import GRPOConfig, PPOConfig
from fusedrl.engine.config.train import RMConfig, SFTConfig
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
    "rollout.overlap_decode": True,
    "rollout.overlong_buffer": 4,
    "rollout.routing_replay": True,
    "train.prefix_sharing": True,
    "lora.dropout": 0.1,
    "ppo.estimator": "gae",
    "ppo.turn_advantages": True,
    "reward.per_turn": True,
    "reward.normalize": True,
    "reward.clip": 5.0,
    "train.context_parallel": 2,
    "train.expert_parallel": 2,
    "train.tensor_parallel": 2,
    "train.data_parallel": "hybrid",
    "train.optimizer_offload": True,
    "critic": "separate",
    "critic_lora.dropout": 0.1,
    "reward_model": "rm",
    "reward_fn": "m:f",
    "reward.weights": [2.0],
    "ppo.ptx_coef": 0.1,
    "lora.rank": 4,
}


# Pairs whose second option is not read beside the first: refused as an option set but unread
# (refuse_ignored), each followed by the option the line names.
IGNORED = [({"reward_model", "reward.weights"}, "reward.weights"),
           ({"train.optimizer_offload", "lora.rank"}, "train.optimizer_offload")]


def config(settings: dict) -> PPOConfig:
    """A GRPO config with `settings` (dotted keys) on; what they need to be read goes beside them
    (lora.rank with lora.dropout, a critic with gae and the reverse, critic_lora.rank and a critic
    with critic_lora.dropout, ptx_file with ppo.ptx_coef, no reward_fn with reward_model (unless
    asked for),
    reward.per_turn under ppo.turn_advantages and an environment under reward.per_turn)."""
    data = {"policy": "p", "prompts_file": "x.jsonl", "output_dir": "o", "reward_fn": "m:f",
            "rollout": {"max_new_tokens": 16}}
    wanted = dict(settings)
    if "lora.dropout" in wanted:
        wanted["lora.rank"] = 4
    if "critic_lora.dropout" in wanted:
        wanted["critic_lora.rank"] = 4
        wanted["critic"] = "separate"
    if wanted.get("ppo.estimator") == "gae" or "critic" in wanted:
        wanted["critic"], wanted["ppo.estimator"] = "separate", "gae"
    if "ppo.ptx_coef" in wanted:
        wanted["ptx_file"] = "demonstrations.jsonl"
    if "reward_model" in wanted:  # scored by it alone, unless reward_fn is asked for too
        del data["reward_fn"]
    if "ppo.turn_advantages" in wanted:
        wanted.setdefault("reward.per_turn", True)
    if "reward.per_turn" in wanted and not {"rollout.tools", "rollout.environment"} & set(wanted):
        wanted["rollout.environment"] = SETTINGS["rollout.environment"]
    for key, value in wanted.items():
        *section, name = key.split(".")
        (data.setdefault(section[0], {}) if section else data)[name] = value
    return GRPOConfig.from_dict(data)


def implied(settings: dict) -> set:
    """The options config(settings) turns on (rollout.routing_replay is on by default)."""
    keys = set(settings) | {"rollout.routing_replay"}
    if "lora.dropout" in keys:
        keys.add("lora.rank")
    if "critic_lora.dropout" in keys:
        keys.add("critic")
    if {"critic", "ppo.estimator"} & keys:
        keys |= {"critic", "ppo.estimator"}
    if "ppo.turn_advantages" in keys:
        keys.add("reward.per_turn")
    if "reward.per_turn" in keys and not {"rollout.tools", "rollout.environment"} & keys:
        keys.add("rollout.environment")
    return keys


def pairs_within(keys: set, moe: bool) -> list:
    """The table's pairs all of whose options are among `keys` (the MoE ones only with moe)."""
    return [p for p in INCOMPATIBLE if (set(p.options()) - {MOE} <= keys
                                        and (moe or not (p.moe or MOE in p.options())))]


def assert_refused_by(error: Exception, pair) -> None:
    message = str(error)
    assert isinstance(error, UsageError) and "\n" not in message, message
    for key in pair.options():
        assert (key if key != MOE else "mixture-of-experts model") in message, (pair, message)


@pytest.mark.parametrize("first,second", list(itertools.combinations(SETTINGS, 2)))
def test_every_pair_is_accepted_or_refused_in_one_line_naming_both(first, second):
    """Without knowing the policy the config refuses exactly the table's pairs; with an MoE
    policy the run's start refuses its pairs too."""
    keys = implied({first: None, second: None})
    refused = pairs_within(keys, moe=False)
    unread = [name for both, name in IGNORED if both <= keys]
    if unread and not refused:
        with pytest.raises(ValueError, match=rf"^{unread[0]}=.* would be ignored: it is not read"):
            config({first: SETTINGS[first], second: SETTINGS[second]})
        return
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
        if "teacher" in pair.options():  # distillation's: tests/engine/stages/test_distill.py
            continue
        assert set(pair.options()) - {MOE} <= set(SETTINGS), pair


@pytest.mark.parametrize("pair", [p for p in INCOMPATIBLE if p.beside], ids=str)
def test_a_pair_refused_beside_a_third_option_is_refused_with_it_only(pair):
    """The pair alone is accepted (unless another row refuses it); with the third option on too it
    is refused in one line naming all three."""
    settings = {key: SETTINGS[key] for key in pair.options()}
    if not pairs_within(implied({pair.first: None, pair.second: None}), moe=False):
        config({pair.first: SETTINGS[pair.first], pair.second: SETTINGS[pair.second]})
    with pytest.raises(ValueError) as e:
        config(settings)
    assert_refused_by(e.value, pairs_within(implied(settings), moe=False)[0])


@pytest.mark.parametrize("settings, refused", [
    ({"train.expert_parallel": 2, "lora.rank": 4}, "train.expert_parallel=2 with lora.rank=4: "),
    ({"train.context_parallel": 2, "train.data_parallel": "replicate"},
     "train.context_parallel=2 with train.data_parallel='replicate': "),
    ({"train.tensor_parallel": 2, "lora.rank": 4, "lora.dropout": 0.1},
     "train.tensor_parallel=2 with lora.dropout=0.1: "),
])
def test_the_supervised_stages_read_the_same_table(settings, refused):
    """SFT's and the reward model's configs refuse the table's pairs of their options (they have no
    rollout: its pairs do not apply)."""
    for stage, extra in ((SFTConfig, {}), (RMConfig, {"format": "pairwise"})):
        data = {"model": "m", "output_dir": "o", "data": {"train_file": "t", **extra}}
        for key, value in settings.items():
            section, name = key.split(".")
            data.setdefault(section, {})[name] = value
        with pytest.raises(ValueError) as e:
            stage.from_dict(data)
        assert isinstance(e.value, UsageError) and str(e.value).startswith(refused), e.value


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


def test_the_docs_and_help_show_the_table():
    """docs/runs.md holds markdown_table() between its markers; `fusedrl grpo --help` ends with every
    pair, `fusedrl sft --help` with those of SFT's options only."""
    docs = (Path(__file__).parents[3] / "docs" / "runs.md").read_text()
    shown = docs.split("<!-- compatibility table -->\n")[1].split("\n<!-- end of compatibility table -->")[0]
    assert shown == markdown_table(), "docs/runs.md: paste markdown_table() between the markers"
    grpo = stage_help("grpo")
    assert all(line in grpo for line in table_lines(GRPOConfig))
    assert len(table_lines()) == len(INCOMPATIBLE) == len(table_lines(GRPOConfig)) + 1
    assert "teacher: distillation" in stage_help("distill")  # the one pair of its own
    sft = table_lines(SFTConfig)
    assert sft and "rollout." not in "".join(sft) and all(line in stage_help("sft") for line in sft)


def stage_help(name: str) -> str:
    """`fusedrl NAME --help`'s text."""
    from fusedrl.engine.cli.commands import build_parser
    return build_parser()._subparsers._group_actions[0].choices[name].format_help()
