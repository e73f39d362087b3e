"""Rollout options composed on a tiny chat model, each visibly applied in the run's metrics or
refused in one line before any model loads: tools with overlong shaping and prefix sharing,
partial rollouts with speculative decoding and prefix sharing, an environment with partial
rollouts (refused)."""
import datasets
import pytest

import fusedrl.kernels as kernels
from fusedrl.engine import GRPOConfig, run_grpo
from fusedrl.engine.errors import UsageError
from fusedrl.engine.train.runlog import read_metrics
from agent_testing import save_chat_model

# Prompts of repeated words: the n-gram drafter finds what followed a word before.
ROWS = [{"prompt": "the dog the dog the dog the dog"}, {"prompt": "a fox a fox a fox a fox"}]


@pytest.fixture(autouse=True)
def torch_kernels():
    with kernels.use_backend("torch"):  # the engine's wiring is under test, not the kernels
        yield


def grpo(tmp_path, rollout: dict, **options):
    model = save_chat_model(tmp_path / "chat", max_position_embeddings=1024)
    config = {"policy": str(model), "output_dir": str(tmp_path / "grpo"), **options,
              "rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2,
                          "kv_cache_memory": 1 << 22, "max_prompt_length": 40, **rollout},
              "ppo": {"minibatch_size": 4},
              "train": {"iterations": 2, "progress": False, "device": "cpu",
                        "prefix_sharing": True}}
    result = run_grpo(config, dataset=datasets.Dataset.from_list(ROWS))
    return [r for r in read_metrics(result.output_dir) if r["kind"] == "train"]


def test_tools_shape_overlong_answers_and_share_their_prompt(tmp_path):
    # A random model rarely ends a turn early: most answers reach 8 tokens, past 8 - 6.
    records = grpo(tmp_path, {"tools": "agent_testing:add", "max_turns": 2, "max_new_tokens": 8,
                              "overlong_buffer": 6}, reward_fn="reward_testing:vowel_fraction")
    for r in records:
        assert r["overlong/penalized"] > 0
        # each group's second trajectory reads the opening (the tools' schemas) from the first
        assert r["prefix/tokens_saved"] > 0
        assert r["prefix/tokens_saved"] == r["row_tokens"] - r["forwarded_tokens"]


def test_partial_rollouts_speculate_and_share_their_prompt(tmp_path):
    records = grpo(tmp_path, {"partial_rollouts": True, "tokens_per_iteration": 30,
                              "max_new_tokens": 6, "ignore_eos": True, "speculative_tokens": 3,
                              "speculate_below": 64}, reward_fn="reward_testing:vowel_fraction")
    assert records[0]["carried"] > 0  # the budget cut the answers: they carry on
    assert sum(r["spec/drafted"] for r in records) > 0
    assert all(r["spec/drafted"] >= r["spec/accepted"] >= 0 for r in records)
    trained = [r for r in records if r["groups_trained"]]
    assert trained and all(r["prefix/tokens_saved"] > 0 for r in trained)


def test_an_environment_with_partial_rollouts_is_refused_before_any_model_loads(tmp_path):
    with pytest.raises(UsageError) as e:
        run_grpo({"policy": str(tmp_path / "absent"), "output_dir": str(tmp_path / "out"),
                  "rollout": {"environment": "turn_testing:LastTurnPays",
                              "partial_rollouts": True}},
                 dataset=datasets.Dataset.from_list(ROWS))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("rollout.environment='turn_testing:LastTurnPays' with "
                              "rollout.partial_rollouts=True: not supported"), message
