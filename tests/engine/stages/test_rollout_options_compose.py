"""Rollout options composed on a tiny chat model through the API's GRPO, each visibly applied in
the run's metrics or refused in one line before any model loads: tools with overlong shaping, tools
with prefix sharing, an environment with partial rollouts (refused), partial rollouts with
speculative decoding and prefix sharing; and DAPO's dynamic sampling around multi-turn
trajectories."""
import datasets
import pytest

import fusedrl.kernels as kernels
from fusedrl.engine import run_grpo
from fusedrl.engine.errors import UsageError
from fusedrl.engine.train.runlog import read_metrics
from agent_testing import save_chat_model
from engine_testing import make_cycle_model, make_tokenizer

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


def test_dynamic_sampling_keeps_the_environment_s_groups_whose_scores_differ(tmp_path):
    # The fox's trajectories all earn 0 (dropped every round), the dog's their turns' vowels: two
    # rounds of both prompts keep the dog's group twice.
    records = grpo(tmp_path, {"environment": "turn_testing:FoxPaysNothing", "max_new_tokens": 6,
                              "env_isolation": "thread", "dynamic_sampling": True,
                              "max_sampling_rounds": 2}, reward_fn=None)
    for r in records:
        assert (r["sampling_rounds"], r["groups_drawn"], r["groups_kept"]) == (2, 4, 2)
        assert r["turns/mean"] == 3 and not r.get("skipped")
