"""Rollout options composed on a tiny chat model through the API's GRPO, each visibly applied in
the run's metrics or refused in one line before any model loads: tools with overlong shaping, tools
with prefix sharing, an environment with partial rollouts (refused), partial rollouts with
speculative decoding and prefix sharing, routing replay of a mixture-of-experts policy with an
environment's turns and with partial rollouts, speculative decoding and chunked prefill; and DAPO's
dynamic sampling around multi-turn trajectories."""
import datasets
import pytest

import fusedrl.kernels as kernels
from fusedrl.engine import run_grpo
from fusedrl.engine.errors import UsageError
from fusedrl.engine.train.runlog import read_metrics
from agent_testing import save_chat_model
from engine_testing import make_chat_tokenizer, make_cycle_model, make_tokenizer
from moe_testing import make_moe_model

# Prompts of repeated words: the n-gram drafter finds what followed a word before.
ROWS = [{"prompt": "the dog the dog the dog the dog"}, {"prompt": "a fox a fox a fox a fox"}]
# Tools run in the trainer's threads: a worker process per trajectory is not what is tested here.
TOOLS = {"tools": "agent_envs:add", "max_turns": 2, "max_new_tokens": 8,
         "env_isolation": "thread"}


@pytest.fixture(autouse=True)
def torch_kernels():
    with kernels.use_backend("torch"):  # the engine's wiring is under test, not the kernels
        yield


def save_cycle_model(path):
    """A model whose answers repeat (engine_testing.make_cycle_model): the n-gram drafter's
    drafts hold, at temperature 1 too."""
    make_cycle_model(period=3).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def grpo(tmp_path, rollout: dict, prefix_sharing: bool = False, model=None, iterations: int = 1,
         **options) -> list[dict]:
    """The train records of a GRPO run (2 prompts x 2 samples) with these options, of `model`
    (default: a tiny chat model)."""
    model = model or save_chat_model(tmp_path / "chat", max_position_embeddings=1024)
    config = {"policy": str(model), "output_dir": str(tmp_path / "grpo"),
              "reward_fn": "reward_testing:vowel_fraction", **options,
              "rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2,
                          "kv_cache_memory": 1 << 22, "max_prompt_length": 40, **rollout},
              "ppo": {"minibatch_size": 4},
              "train": {"iterations": iterations, "progress": False, "device": "cpu",
                        "prefix_sharing": prefix_sharing}}
    result = run_grpo(config, dataset=datasets.Dataset.from_list(ROWS))
    records = [r for r in read_metrics(result.output_dir) if r["kind"] == "train"]
    assert len(records) == iterations
    return records


def test_tools_with_overlong_shaping_penalize_long_answers(tmp_path):
    # A random model rarely ends a turn early: most turns reach 8 tokens, past 8 - 6.
    records = grpo(tmp_path, {**TOOLS, "overlong_buffer": 6})
    assert all(r["overlong/penalized"] > 0 for r in records)
    assert all(r["prefix/tokens_saved"] == 0 for r in records)  # prefix sharing is off


def test_tools_with_prefix_sharing_forward_each_opening_once(tmp_path):
    records = grpo(tmp_path, TOOLS, prefix_sharing=True)
    for r in records:
        # each group's second trajectory reads the opening (the tools' schemas) from the first
        assert r["prefix/tokens_saved"] > 0
        assert r["prefix/tokens_saved"] == r["row_tokens"] - r["forwarded_tokens"]
        assert r["overlong/penalized"] == 0  # overlong shaping is off


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
    assert not (tmp_path / "out").exists()


def test_partial_rollouts_speculate_and_share_their_prompt(tmp_path):
    records = grpo(tmp_path, {"partial_rollouts": True, "tokens_per_iteration": 40,
                              "max_new_tokens": 12, "ignore_eos": True, "speculative_tokens": 3,
                              "speculate_below": 64}, prefix_sharing=True,
                   model=save_cycle_model(tmp_path / "cycle"), iterations=2)
    assert records[0]["carried"] > 0  # the budget cut the answers: they carry on
    assert all(r["spec/drafted"] >= r["spec/accepted"] > 0 for r in records)
    trained = [r for r in records if r["groups_trained"]]
    assert trained and all(r["prefix/tokens_saved"] > 0 for r in trained)
    assert all(r["staleness_max"] >= 0 for r in trained)


def save_moe_chat_model(path):
    """A tiny mixture-of-experts model (moe_testing) with the chat tokenizer: routing replay's."""
    make_moe_model("qwen3_moe", max_position_embeddings=1024).save_pretrained(path)
    make_chat_tokenizer().save_pretrained(path)
    return path


def replayed_every_forwarded_token(record, rows):
    """Every token of the rows has the sampler's routing records but each row's last (never
    forwarded): the training forwards route all the others as the sampler did."""
    assert record["routing/replayed_tokens"] == record["row_tokens"] - rows > 0


def test_routing_replay_records_an_environment_s_every_turn(tmp_path):
    records = grpo(tmp_path, {"environment": "agent_envs:ThreeTurns", "max_new_tokens": 6,
                              "env_isolation": "thread"}, reward_fn=None,
                   model=save_moe_chat_model(tmp_path / "moe"))
    for r in records:
        assert r["turns/mean"] > 1 and r["tokens/environment"] > 0
        replayed_every_forwarded_token(r, rows=4)


def test_routing_replay_records_partial_speculative_and_chunked_forwards(tmp_path):
    # Prompts of 10 tokens prefilled 4 at a time; the budget cuts the answers (carried: their
    # records come from the forwards of the iteration that completes them).
    records = grpo(tmp_path, {"partial_rollouts": True, "tokens_per_iteration": 40,
                              "max_new_tokens": 12, "ignore_eos": True, "speculative_tokens": 3,
                              "speculate_below": 64, "prefill_chunk": 4},
                   model=save_moe_chat_model(tmp_path / "moe"), iterations=2)
    assert records[0]["carried"] > 0 and sum(r["spec/drafted"] for r in records) > 0
    trained = [r for r in records if r["groups_trained"]]
    assert trained
    for r in trained:
        replayed_every_forwarded_token(r, rows=2 * r["groups_trained"])


def test_dynamic_sampling_keeps_the_environment_s_groups_whose_scores_differ(tmp_path):
    # The fox's trajectories all earn 0 (dropped every round), the dog's their turns' vowels: two
    # rounds of both prompts keep the dog's group twice.
    records = grpo(tmp_path, {"environment": "turn_testing:FoxPaysNothing", "max_new_tokens": 6,
                              "env_isolation": "thread", "dynamic_sampling": True,
                              "max_sampling_rounds": 2}, reward_fn=None)
    for r in records:
        assert (r["sampling_rounds"], r["groups_drawn"], r["groups_kept"]) == (2, 4, 2)
        assert r["turns/mean"] == 3 and not r.get("skipped")
