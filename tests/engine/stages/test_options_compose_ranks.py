"""Context parallelism (train.context_parallel=2 on 2 gloo CPU ranks, one torchrun launch for all
runs) composed with what reads whole rollouts: an environment's and tools' multi-turn trajectories,
partial rollouts carried across iterations, and PPO's critic (a value head on the policy's trunk,
or a separate value model), each visibly applied: the context group's size and the tokens a rank
forwards logged, and the option's own metric nonzero."""
import pytest

from fusedrl.engine.config.ppo import (GRPOConfig, LoopConfig, PPOConfig, RolloutConfig,
                                       UpdateConfig)
from fusedrl.engine.config.train import OptimConfig
from fusedrl.engine.train.runlog import read_metrics
from agent_testing import save_chat_model
from dist_testing import check, stage_run, torchrun_runs
from train_testing import write_jsonl

PROMPTS = ["hello world", "the brown dog", "lazy fox", "over the"]


def rollout(**options):
    return RolloutConfig(**{"prompts_per_iteration": 2, "samples_per_prompt": 2,
                            "max_new_tokens": 6, "kv_cache_memory": 1 << 22,
                            "max_prompt_length": 40, **options})


def run(root, name, cls=GRPOConfig, iterations=1, **fields):
    """A stage run of `cls` (GRPO, or PPO with its critic) at train.context_parallel=2."""
    fields = {"reward_fn": "reward_testing:vowel_fraction", "rollout": rollout(),
              "ppo": UpdateConfig(minibatch_size=4, **({"estimator": "grpo"} if cls is GRPOConfig
                                                      else {})), **fields}
    cfg = cls(policy=str(root / "chat"), prompts_file=str(root / "prompts.jsonl"),
              output_dir=str(root / name), optim=OptimConfig(lr=1e-4),
              train=LoopConfig(iterations=iterations, progress=False, device="cpu",
                               context_parallel=2), **fields)
    return stage_run("ppo" if cls is PPOConfig else "grpo", cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose_ranks")
    save_chat_model(root / "chat", max_position_embeddings=1024)
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    check(torchrun_runs([
        run(root, "environment", rollout=rollout(environment="agent_envs:ThreeTurns", max_turns=3,
                                                 env_isolation="thread"), reward_fn=None),
        run(root, "partial", iterations=2,
            rollout=rollout(partial_rollouts=True, tokens_per_iteration=30, ignore_eos=True)),
        run(root, "tools", rollout=rollout(tools="agent_envs:add", max_turns=2,
                                           env_isolation="thread")),
        run(root, "shared_critic", PPOConfig, critic="shared"),
        run(root, "separate_critic", PPOConfig, critic="separate"),
    ], root, timeout=300, env={"FUSEDRL_BACKEND": "torch"}))
    return root


def train_records(root, name):
    return [r for r in read_metrics(root / name) if r["kind"] == "train"]


def context_applied(record):
    assert record["context/size"] == 2 and record["context/tokens_per_rank"] > 0
    # each rank forwards half the pack (and at most one token of padding)
    assert record["context/tokens_per_rank"] == -(-record["forwarded_tokens"] // 2)


def test_an_environment_trains_context_parallel(runs):
    for r in train_records(runs, "environment"):
        context_applied(r)
        assert r["turns/mean"] > 1 and r["tokens/environment"] > 0 and "policy_loss" in r


def test_partial_rollouts_carry_context_parallel(runs):
    records = train_records(runs, "partial")
    assert records[0]["carried"] > 0
    trained = [r for r in records if r["groups_trained"]]
    assert trained
    for r in trained:
        context_applied(r)


def test_tools_train_context_parallel(runs):
    for r in train_records(runs, "tools"):
        context_applied(r)
        assert r["turns/mean"] >= 1 and "policy_loss" in r


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_ppo_s_critic_trains_context_parallel(runs, critic):
    """A value head on the policy's trunk, or a separate value model: each reads its rank's shard
    of the pack, its values gathered over the group."""
    for r in train_records(runs, f"{critic}_critic"):
        context_applied(r)
        assert r["value_loss"] > 0 and "explained_variance" in r
