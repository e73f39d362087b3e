"""GRPO and PPO tensor-parallel under torchrun (gloo CPU ranks, engine/tensor_parallel.py): the policy and the
reference laid out for T=2 tensor ranks, the tensor group sampling in lockstep from the same seeds
and its first rank alone calling the reward function. The comparison the per-rank sizes make exact:
rollout.prompts_per_iteration and ppo.minibatch_size are per data rank (a tensor group is one data
rank), so T=2 on 2 ranks runs one process's config, and T=2 x 2 data groups on 4 ranks runs half
of each size per group, the global batch of one process with the whole sizes (one minibatch of the
whole rollout, so the update does not depend on how the rows are split); there the slices are
sharded over the data groups, gathered for each rollout anew or into persistent buffers. PPO with a reward model,
the reference and a separate critic, every model laid out for the tensor ranks, and with a value head
on the policy (critic=shared), at T=2 on 2 ranks."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from fusedrl.engine.config.ppo import (GRPOConfig, PPOConfig, LoopConfig, RewardConfig,
                                       RolloutConfig, UpdateConfig)
from fusedrl.engine.config.train import OptimConfig
from fusedrl.engine.errors import UsageError
from fusedrl.engine.plan.check import refuse_unfit
from fusedrl.engine.stages.ppo.trainer import train_ppo
from fusedrl.engine.train.runlog import read_metrics
from dist_testing import check, rank_0_call, rank_threads, stage_run, torchrun_runs
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.reward_model import reward_model_from_lm, save_reward_model
from train_testing import copy_checkpoint, save_tiny_model, write_jsonl


def recording_reward(prompts, responses):
    """Vowel fraction of each response; appends [prompt, response] rows to $RECORD_DIR/rank-R.jsonl."""
    with open(os.path.join(os.environ["RECORD_DIR"], f"rank-{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
        for p, r in zip(prompts, responses):
            f.write(json.dumps([p, r]) + "\n")
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


def records(directory, rank):
    path = directory / f"rank-{rank}.jsonl"
    return [tuple(row) for row in map(json.loads, path.read_text().splitlines())] if path.exists() else []


def grpo_config(root, name, data_ranks=1, t=1, persistent_weights=False, **loop):
    # 4 prompts x 3 samples per iteration in all; 2 epochs (the second with ratios off 1). Adam's eps
    # 1e-6: an element whose gradient is near 0 (rounding where the slices sum in another order)
    # would otherwise take an update of order lr (see test_tensor_parallel_training.py).
    return GRPOConfig(policy=str(root / "policy"), prompts_file=str(root / "prompts.jsonl"),
                      output_dir=str(root / name), reward_fn="test_ppo_tensor_parallel:recording_reward",
                      rollout=RolloutConfig(prompts_per_iteration=4 // data_ranks, samples_per_prompt=3,
                                            max_new_tokens=6, kv_cache_memory=1 << 22,
                                            persistent_weights=persistent_weights),
                      ppo=UpdateConfig(estimator="grpo", kl_loss_coef=0.05, vf_coef=0.0, epochs=2,
                                       agg="token-mean", minibatch_size=12 // data_ranks),
                      optim=OptimConfig(lr=1e-3, eps=1e-6),
                      # In the rank's own process: no worker importing this module (and torch).
                      reward=RewardConfig(kl_coef=0.0, isolation="thread"),
                      train=LoopConfig(iterations=2, progress=False, device="cpu", precision="fp32",
                                       tensor_parallel=t, **loop))


@pytest.fixture(scope="module")
def runs(launches):
    """GRPO at T=2 on 2 ranks (resumed from its first checkpoint too) and at T=2 x 2 data groups on
    4 ranks, with and without persistent buffers and offloaded shards; one process's run."""
    root = launches / "grpo"
    os.environ["RECORD_DIR"] = str(root / "rec-one")
    try:
        with rank_threads():
            train_ppo(grpo_config(root, "one"))
    finally:
        del os.environ["RECORD_DIR"]
    return root


def ppo_config(root, name, t=1, critic="separate"):
    return PPOConfig(policy=str(root / "policy"), prompts_file=str(root / "prompts.jsonl"), output_dir=str(root / name),
                     reward_model=str(root / "rm"), critic=critic,
                     rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=2, max_new_tokens=6,
                                           kv_cache_memory=1 << 22),
                     ppo=UpdateConfig(epochs=2, minibatch_size=4), optim=OptimConfig(lr=1e-3, eps=1e-6),
                     train=LoopConfig(iterations=2, progress=False, device="cpu", precision="fp32",
                                      tensor_parallel=t))


def save_policy_and_reward_model(root) -> None:
    """root/policy (llama2: 4 key/value heads, untied head) and root/rm, its reward model with a
    random score head."""
    policy = save_tiny_model(root / "policy")
    rm = reward_model_from_lm(load_model(policy))
    torch.nn.init.normal_(rm.score.weight, generator=torch.Generator().manual_seed(0))
    save_reward_model(rm, root / "rm", source_dir=policy)


@pytest.fixture(scope="module")
def ppo_runs(launches):
    root = launches / "ppo"
    with rank_threads():
        train_ppo(ppo_config(root, "one"))
        train_ppo(ppo_config(root, "shared_one", critic="shared"))
    return root


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Every torchrun run of the module, in one launch per world size: GRPO (under grpo/) and PPO
    (under ppo/) at T=2 on 2 ranks, GRPO at T=2 x 2 data groups on 4."""
    root = tmp_path_factory.mktemp("ppo_tp_launches")
    grpo, ppo = root / "grpo", root / "ppo"
    save_tiny_model(grpo / "policy")  # llama2: 4 key/value heads, untied head
    write_jsonl(grpo / "prompts.jsonl", [{"prompt": p} for p in ["the quick brown", "hello world", "lazy dog",
                                                                  "fox jumps", "over the", "brown fox"]])
    for name in ("one", "t2", "resumed", "t2dp2", "t2dp2_persistent"):
        (grpo / f"rec-{name}").mkdir()
    save_policy_and_reward_model(ppo)
    write_jsonl(ppo / "prompts.jsonl", [{"prompt": p} for p in ["the quick brown", "hello world", "lazy dog"]])

    def run(name, *args, **loop):
        return stage_run("grpo", grpo_config(grpo, name, *args, **loop), env={"RECORD_DIR": str(grpo / f"rec-{name}")})
    check(torchrun_runs([run("t2", 1, 2, save_every=1),
                         rank_0_call(copy_checkpoint, grpo / "t2", 1, grpo / "resumed"),
                         run("resumed", 1, 2),
                         stage_run("ppo", ppo_config(ppo, "t2", 2)),
                         stage_run("ppo", ppo_config(ppo, "shared_t2", 2, "shared"))], root, timeout=600))
    check(torchrun_runs([run("t2dp2", 2, 2),
                         run("t2dp2_persistent", 2, 2, persistent_weights=True, optimizer_offload=True,
                             frozen_offload=True)], root, nproc=4, timeout=600))
    return root


def max_relative_diff(dir_a, dir_b, file="model.safetensors") -> float:
    """max |a - b| / max |a| over every tensor of two exported models (the bar: <= 1e-4), or
    of another safetensors `file` in two directories."""
    a, b = load_file(dir_a / file), load_file(dir_b / file)
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)


def train_metrics(run, key):
    return [r[key] for r in read_metrics(run) if r["kind"] == "train"]


def test_two_tensor_ranks_roll_out_score_once_and_train_one_process_s_weights(runs):
    one = records(runs / "rec-one", 0)
    assert len(one) == 2 * 12
    assert records(runs / "rec-t2", 0) == one and records(runs / "rec-t2", 1) == []  # tensor rank 1 never scores
    assert max_relative_diff(runs / "one" / "final", runs / "t2" / "final") <= 1e-4
    for key in ("loss", "kl_loss", "score_mean", "grad_norm"):
        assert train_metrics(runs / "t2", key) == pytest.approx(train_metrics(runs / "one", key), rel=1e-4), key
    assert train_metrics(runs / "t2", "tokens") == train_metrics(runs / "one", "tokens")


def test_a_tensor_parallel_run_resumes_exactly(runs):
    """From its first checkpoint (the policy's slices, their optimizer state, the loop state) the
    second iteration at T=2 ends with the uninterrupted run's weights."""
    assert records(runs / "rec-resumed", 0) == records(runs / "rec-t2", 0)[12:]     # the second iteration only
    assert max_relative_diff(runs / "t2" / "final", runs / "resumed" / "final") == 0


def test_two_tensor_ranks_by_two_data_groups_train_one_process_s_weights(runs):
    one, rec = records(runs / "rec-one", 0), runs / "rec-t2dp2"
    assert [records(rec, r) == [] for r in range(4)] == [False, True, False, True]  # each group's first rank
    for iteration in (0, 1):  # the first 2 prompts of an iteration are data group 0's, the next 2 group 1's
        assert records(rec, 0)[6 * iteration:6 * iteration + 6] == one[12 * iteration:12 * iteration + 6]
        assert records(rec, 2)[6 * iteration:6 * iteration + 6] == one[12 * iteration + 6:12 * iteration + 12]
    assert max_relative_diff(runs / "one" / "final", runs / "t2dp2" / "final") <= 1e-4
    for key in ("loss", "kl_loss", "score_mean"):
        assert train_metrics(runs / "t2dp2", key) == pytest.approx(train_metrics(runs / "one", key), rel=1e-4), key


def test_persistent_buffers_and_offloaded_shards_of_the_data_sharded_slices_change_nothing(runs):
    """rollout.persistent_weights at T=2 x 2 data groups (the slices sharded over the data groups by
    FSDP2, gathered for each rollout into buffers allocated once), with the policy's shards and
    optimizer state and the reference's shards in CPU memory (train.optimizer_offload,
    train.frozen_offload): the same samples and, bit for bit, the same weights as without them."""
    for rank in range(4):
        assert records(runs / "rec-t2dp2_persistent", rank) == records(runs / "rec-t2dp2", rank)
    assert max_relative_diff(runs / "t2dp2" / "final", runs / "t2dp2_persistent" / "final") == 0


def test_what_does_not_run_tensor_parallel_is_refused_in_one_line(tmp_path):
    cfg = grpo_config(tmp_path, "refused", t=2)
    cfg.rollout.exact = cfg.train.frozen_offload = True
    with pytest.raises(UsageError, match=r"^train.tensor_parallel=2 with rollout.exact=True: not supported \("):
        refuse_unfit(cfg, torch.device("cpu"), 2)  # a pair of the compatibility table
    cfg.rollout.exact = False
    with pytest.raises(UsageError, match=r"^train.tensor_parallel=2 with train.frozen_offload=true "
                                         r"without tensor slices sharded over the data groups: "
                                         r"not supported tensor-parallel \(SFT, RM, PPO and GRPO train "
                                         r"tensor-parallel, LoRA included\)$"):
        refuse_unfit(cfg, torch.device("cpu"), 2)
    cfg.train.optimizer_offload = True
    refuse_unfit(cfg, torch.device("cpu"), 4)  # 2 data groups shard the slices: both offloads run
    with pytest.raises(UsageError, match=r"^train.optimizer_offload=true with train.tensor_parallel=2 "
                                         r"on 2 GPUs at train.data_parallel=shard: expected"):
        refuse_unfit(cfg, torch.device("cpu"), 2)


def test_ppo_with_a_reward_model_reference_and_critic_trains_tensor_parallel(ppo_runs):
    """The reward model scores, the reference and the critic run, and the policy and the critic train,
    each on its tensor slices."""
    for final in ("final", "final_critic"):
        assert max_relative_diff(ppo_runs / "one" / final, ppo_runs / "t2" / final) <= 1e-4, final
    for key in ("loss", "score_mean", "kl", "value_loss", "explained_variance"):
        # abs: the KL per sequence is a sum of differences of near-equal log-probs (6e-6 apart here).
        assert train_metrics(ppo_runs / "t2", key) == pytest.approx(train_metrics(ppo_runs / "one", key),
                                                                   rel=1e-4, abs=2e-5), key


def test_ppo_with_a_value_head_on_the_tensor_parallel_policy(ppo_runs):
    """critic=shared: the value head, whole on every rank, reads the trunk's replicated hidden states;
    its gradients averaged over the ranks."""
    assert max_relative_diff(ppo_runs / "shared_one" / "final", ppo_runs / "shared_t2" / "final") <= 1e-4
    for key in ("loss", "value_loss", "explained_variance"):
        assert train_metrics(ppo_runs / "shared_t2", key) == pytest.approx(
            train_metrics(ppo_runs / "shared_one", key), rel=1e-4, abs=2e-5), key
