"""Rollout options composed on a tiny chat model through the API's GRPO, each visibly applied in
the run's metrics: tools with overlong shaping, tools with prefix sharing, an environment's and
tools' trajectories carried by partial rollouts (and restarted on resume), partial rollouts with
speculative decoding and prefix sharing, routing replay of a mixture-of-experts policy with an
environment's and tools' turns and with partial rollouts, speculative decoding and chunked prefill;
and DAPO's dynamic sampling around multi-turn trajectories."""
import datasets
import pytest

import fusedrl.kernels as kernels
from fusedrl.engine import run_grpo
from fusedrl.engine.train.runlog import read_metrics
from agent_testing import save_chat_model
from train_testing import copy_checkpoint
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
         run: str = "grpo", train: dict | None = None, **options) -> list[dict]:
    """The train records of a GRPO run (2 prompts x 2 samples) with these options, of `model`
    (default: a tiny chat model), in tmp_path / run; `train`: more of the train section."""
    model = model or save_chat_model(tmp_path / "chat", max_position_embeddings=1024)
    config = {"policy": str(model), "output_dir": str(tmp_path / run),
              "reward_fn": "reward_testing:vowel_fraction", **options,
              "rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2,
                          "kv_cache_memory": 1 << 22, "max_prompt_length": 40, **rollout},
              "ppo": {"minibatch_size": 4},
              "train": {"iterations": iterations, "progress": False, "device": "cpu",
                        "prefix_sharing": prefix_sharing, **(train or {})}}
    result = run_grpo(config, dataset=datasets.Dataset.from_list(ROWS))
    return [r for r in read_metrics(result.output_dir) if r["kind"] == "train"]


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


def test_an_environment_s_trajectories_carry_across_iterations(tmp_path):
    # 2 groups of 2 three-turn trajectories in flight, a budget of 24 model tokens an iteration (up
    # to 18 a trajectory): the budget cuts them in iteration 1, their environments stay alive and
    # they go on, turn after turn, until a group completes.
    # An environment is not in a checkpoint: a run resumed after iteration 1 restarts the
    # trajectories it had in flight.
    model = save_chat_model(tmp_path / "chat", max_position_embeddings=1024)
    rollout = {"environment": "agent_envs:ThreeTurns", "max_new_tokens": 6,
               "env_isolation": "thread", "partial_rollouts": True, "prompts_per_iteration": 1,
               "tokens_per_iteration": 24}
    records = grpo(tmp_path, rollout, model=model, reward_fn=None, iterations=3,
                   train={"save_every": 1, "keep_checkpoints": 0})
    assert len(records) == 3 and records[0]["carried"] > 0 and records[0]["groups_trained"] == 0
    trained = [r for r in records if r["groups_trained"]]
    assert trained
    for r in trained:
        # tokens drawn an iteration before they trained, across the environment's turns
        assert r["staleness_max"] >= 1 and r["turns/mean"] > 1 and r["tokens/environment"] > 0
        assert r["restarted"] == 0 and "policy_loss" in r
    copy_checkpoint(tmp_path / "grpo", 1, tmp_path / "resumed")
    resumed = grpo(tmp_path, rollout, model=model, reward_fn=None, iterations=2, run="resumed",
                   train={"resume": True})
    assert resumed[-1]["step"] == 2 and resumed[-1]["restarted"] == records[0]["carried"]


def test_tools_trajectories_carry_across_iterations(tmp_path):
    records = grpo(tmp_path, {**TOOLS, "partial_rollouts": True, "prompts_per_iteration": 1,
                              "tokens_per_iteration": 12}, iterations=3)
    assert records[0]["carried"] > 0 and records[0]["groups_trained"] == 0
    trained = [r for r in records if r["groups_trained"]]
    assert trained and all(r["staleness_max"] >= 1 and r["turns/mean"] >= 1 for r in trained)


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


def test_routing_replay_records_tools_trajectories(tmp_path):
    records = grpo(tmp_path, TOOLS, model=save_moe_chat_model(tmp_path / "moe"))
    for r in records:
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


def test_partial_rollouts_with_dynamic_sampling_train_the_varied_groups_they_complete(tmp_path):
    # The fox's trajectories all earn 0: its complete group is dropped, the dog's trains; the
    # groups in flight top the next iteration up.
    records = grpo(tmp_path, {"environment": "turn_testing:FoxPaysNothing", "max_new_tokens": 6,
                              "env_isolation": "thread", "dynamic_sampling": True,
                              "partial_rollouts": True, "prompts_per_iteration": 1,
                              "tokens_per_iteration": 40},
                   reward_fn=None, iterations=4)
    trained = [r for r in records if r.get("groups_kept")]
    assert trained and all(r["groups_kept"] <= r["groups_drawn"] for r in trained)
    assert sum(r["groups_drawn"] - r["groups_kept"] for r in records if "groups_drawn" in r) > 0
    for r in trained:
        assert r["grad_norm"] > 0 and r["policy_loss"] != 0 and r["drawn_tokens"] > 0
