"""PPO data-parallel under torchrun (2 CPU ranks over gloo, FSDP2): each rank's rollouts are the
one-process rollouts of its prompts, in every iteration; a rank killed after the first checkpoint
brings the job down and the rerun resumes exactly; a rank raising ends the job with its message;
statistics over the batch (reinforce_pp_baseline's) span every rank's rows."""
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from fusedrl.engine.config.ppo import (LoopConfig, PPOConfig, RewardConfig, RolloutConfig,
                                       UpdateConfig)
from fusedrl.engine.config.train import OptimConfig
from fusedrl.engine.stages.ppo.trainer import train_ppo
from fusedrl.engine.train.checkpoint import list_checkpoints
from dist_testing import check, rank_threads, stage_run, torchrun, torchrun_runs
from reward_testing import vowel_fraction
from train_testing import save_tiny_model, write_jsonl

HANG = 150  # seconds: a failing job ends well within it (about 20 s unloaded), a hung one never
# Reward calls of this process by record directory: one per iteration of the run recording there
# (the runs of one launch share the process).
_calls: dict[str, int] = {}


def recording_reward(prompts, responses):
    """Vowel fraction of each response; appends (iteration, rank, prompt, response) rows to
    $RECORD_DIR/rank-R.jsonl, and fails on purpose when $FAIL_AT is "rank:iteration:raise|kill"."""
    directory = os.environ["RECORD_DIR"]
    rank, iteration = int(os.environ.get("RANK", "0")), _calls.get(directory, 0)
    _calls[directory] = iteration + 1
    with open(os.path.join(directory, f"rank-{rank}.jsonl"), "a") as f:
        for p, r in zip(prompts, responses):
            f.write(json.dumps([iteration, p, r]) + "\n")
    fail_rank, fail_iteration, how = (os.environ.get("FAIL_AT") or "-1:-1:none").split(":")
    if (rank, iteration) == (int(fail_rank), int(fail_iteration)):
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"rank {rank} fails on purpose in iteration {iteration}")
    return vowel_fraction(prompts, responses)


def records(directory, rank):
    return [tuple(row) for row in map(json.loads, (directory / f"rank-{rank}.jsonl").read_text().splitlines())]


def ppo_config(root, name, ranks, **loop):
    # 4 prompts per iteration in all (the sizes are per rank: 2 on each of 2 ranks), 3 samples each;
    # one minibatch of the whole rollout, so the update does not depend on how the rows are split.
    return PPOConfig(policy=str(root / "policy"), prompts_file=str(root / "prompts.jsonl"),
                     output_dir=str(root / name), reward_fn="test_ppo_data_parallel:recording_reward",
                     rollout=RolloutConfig(prompts_per_iteration=4 // ranks, samples_per_prompt=3, max_new_tokens=6,
                                           kv_cache_memory=1 << 22),
                     ppo=UpdateConfig(epochs=2, minibatch_size=12 // ranks), critic="shared",
                     # In the rank's own process: FAIL_AT=kill kills the rank.
                     reward=RewardConfig(isolation="thread"),
                     train=LoopConfig(**{"iterations": 2, "progress": False, "device": "cpu", **loop}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process and two ranks, 2 iterations each, checkpointing every iteration; beside them the
    module's other 2-rank runs, all in one launch: token budgets with offload (budget), GRPO with
    dynamic sampling (dynamic/) and reinforce_pp_baseline (reinforce/, with its one-process run)."""
    root = tmp_path_factory.mktemp("ppo_dp")
    save_tiny_model(root / "policy")
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in ["the quick brown", "hello world", "lazy dog",
                                                                  "fox jumps", "over the", "brown fox"]])
    for name in ("one", "two", "budget"):
        (root / f"rec-{name}").mkdir()
    os.environ["RECORD_DIR"] = str(root / "rec-one")
    try:
        train_ppo(ppo_config(root, "one", 1))
    finally:
        del os.environ["RECORD_DIR"]
    save_policy_and_prompts(root / "dynamic", ["hello world", "the quick brown", "lazy dog", "fox jumps"])
    save_policy_and_prompts(root / "reinforce", ["the quick brown", "lazy dog", "fox jumps", "over the"])
    with rank_threads():
        train_ppo(reinforce_config(root / "reinforce", "one", 1))
    check(torchrun_runs([stage_run("ppo", ppo_config(root, "two", 2, save_every=1),
                                   env={"RECORD_DIR": str(root / "rec-two")}),
                         stage_run("ppo", budget_config(root), env={"RECORD_DIR": str(root / "rec-budget")}),
                         stage_run("grpo", dynamic_sampling_config(root / "dynamic")),
                         stage_run("grpo", reinforce_config(root / "reinforce", "two", 2))], root, timeout=HANG * 3))
    return root


def save_policy_and_prompts(root, prompts) -> None:
    save_tiny_model(root / "policy")
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in prompts])


def budget_config(root):
    """Two ranks cutting their rows by tokens (the update's micro-batches and the scoring forwards),
    with the trained models' state and the reference offloaded (FSDP2's CPUOffloadPolicy: the
    optimizer steps there). Rows are 3 or 4 prompt tokens ("hello world") + 6: a budget of 18 holds
    two short rows but not a long one with another, so the rank without "hello world" needs fewer
    forwards."""
    cfg = ppo_config(root, "budget", 2)
    cfg.rollout = RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3, max_new_tokens=6, max_prompt_length=12,
                                kv_cache_memory=1 << 22, tokens_per_forward=18)
    cfg.ppo = UpdateConfig(epochs=2, minibatch_size=6, tokens_per_microbatch=18)
    cfg.train = LoopConfig(iterations=2, progress=False, device="cpu", optimizer_offload=True, frozen_offload=True)
    return cfg


def test_each_rank_rolls_out_what_one_process_does(runs):
    one = records(runs / "rec-one", 0)
    rank0, rank1 = records(runs / "rec-two", 0), records(runs / "rec-two", 1)
    assert len(one) == 2 * 12 and len(rank0) == len(rank1) == 2 * 6
    for iteration in (0, 1):
        rows = [r for r in one if r[0] == iteration]
        # The first 2 prompts of an iteration are rank 0's, the next 2 rank 1's.
        assert [r for r in rank0 if r[0] == iteration] == rows[:6]
        assert [r for r in rank1 if r[0] == iteration] == rows[6:]
    a, b = load_file(runs / "one" / "final" / "model.safetensors"), load_file(runs / "two" / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_token_budgets_and_offload_under_torchrun_end_with_one_process_s_weights(runs):
    """budget_config's ranks run different numbers of forwards, evened out with spare ones, and end
    with the weights of one process that runs each minibatch at once, with train.optimizer_offload
    and train.frozen_offload on."""
    from fusedrl.engine.train.runlog import read_metrics

    assert records(runs / "rec-budget", 0) + records(runs / "rec-budget", 1) == \
        records(runs / "rec-two", 0) + records(runs / "rec-two", 1)                # the same rollouts
    train = [r for r in read_metrics(runs / "budget") if r["kind"] == "train"]
    assert sum(r["spare_forwards"] for r in train) > 0                              # the ranks did differ
    a, b = load_file(runs / "one" / "final" / "model.safetensors"), load_file(runs / "budget" / "final" / "model.safetensors")
    worst = max((float((a[name] - b[name]).abs().max() / a[name].abs().max().clamp_min(1e-12)), name) for name in a)
    assert worst[0] <= 1e-4, f"max |diff| / max |w| of {worst[1]} is {worst[0]:.3g}"


def test_killed_rank_brings_the_job_down_and_the_rerun_resumes_exactly(runs, tmp_path):
    (tmp_path / "rec").mkdir()
    cfg = ppo_config(runs, "killed", 2, save_every=1)
    env = {"RECORD_DIR": str(tmp_path / "rec"), "FAIL_AT": "1:1:kill"}
    # A job that hung instead of ending would raise subprocess.TimeoutExpired here.
    killed = torchrun("ppo", cfg, tmp_path, env=env, timeout=HANG)
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    assert [p.name for p in list_checkpoints(runs / "killed")] == ["step-00000001"]
    check(torchrun("ppo", cfg, tmp_path, env={"RECORD_DIR": str(tmp_path / "rec")}))
    a, b = load_file(runs / "two" / "final" / "model.safetensors"), load_file(runs / "killed" / "final" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_rank_raising_ends_the_job_with_its_message(runs, tmp_path):
    (tmp_path / "rec").mkdir()
    result = torchrun("ppo", ppo_config(runs, "raises", 2, dist_timeout_s=30), tmp_path,
                      env={"RECORD_DIR": str(tmp_path / "rec"), "FAIL_AT": "1:0:raise"}, timeout=HANG)
    assert result.returncode != 0
    assert "RuntimeError: rank 1 fails on purpose in iteration 0" in result.stderr, result.stderr[-3000:]


def flat_for_hello(prompts, responses):
    """The same score for every response to a "hello" prompt (a group dynamic sampling drops), the
    vowel fraction otherwise."""
    return [1.0 if "hello" in p else score for p, score in zip(prompts, vowel_fraction(prompts, responses))]


def dynamic_sampling_config(root):
    """GRPO with dynamic sampling on 2 ranks, a "hello" prompt's group dropped (flat_for_hello)."""
    from fusedrl.engine.config.ppo import GRPOConfig

    return GRPOConfig(policy=str(root / "policy"), prompts_file=str(root / "prompts.jsonl"),
                      output_dir=str(root / "grpo"), reward_fn="test_ppo_data_parallel:flat_for_hello",
                      rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3, max_new_tokens=6,
                                            kv_cache_memory=1 << 22, dynamic_sampling=True,
                                            max_sampling_rounds=2),
                      ppo=UpdateConfig(epochs=1, minibatch_size=3, estimator="grpo", kl_loss_coef=0.01),
                      train=LoopConfig(iterations=2, progress=False, device="cpu"))


def test_critic_free_with_dynamic_sampling_keeps_ranks_in_step(runs):
    """GRPO under 2 ranks with dynamic sampling: ranks drop different groups, yet both keep as many
    rows (the fewest any rank keeps), so they take the same updates and the job finishes."""
    from fusedrl.engine.train.runlog import read_metrics

    rows = read_metrics(runs / "dynamic" / "grpo")
    assert rows[0]["world_size"] == 2
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 2
    for r in train:
        assert r["groups_kept"] % 2 == 0 and r["groups_kept"] <= 4  # balanced: as many on each rank
        assert len(r["tokens_per_rank"]) == 2 and r["updates"] >= 1
    assert (runs / "dynamic" / "grpo" / "final" / "config.json").exists()


def reinforce_config(root, name, ranks):
    """4 prompts x 3 samples in all; one minibatch of the whole rollout, two updates on it (one
    iteration: the whitening, not the rollout, is under test)."""
    from fusedrl.engine.config.ppo import GRPOConfig

    return GRPOConfig(policy=str(root / "policy"), prompts_file=str(root / "prompts.jsonl"),
                      output_dir=str(root / name),
                      reward_fn="reward_testing:vowel_fraction",
                      rollout=RolloutConfig(prompts_per_iteration=4 // ranks, samples_per_prompt=3,
                                            max_new_tokens=6, kv_cache_memory=1 << 22),
                      ppo=UpdateConfig(epochs=2, minibatch_size=12 // ranks, estimator="reinforce_pp_baseline",
                                       kl_loss_coef=0.01),
                      optim=OptimConfig(lr=1e-4),
                      train=LoopConfig(iterations=1, progress=False, device="cpu"))


def test_reinforce_pp_baseline_ends_with_one_process_s_weights(runs):
    """GRPO with ppo.estimator=reinforce_pp_baseline, whose group-centred scores are whitened over the
    whole batch: two ranks with half the prompts each end with the weights of one process with the
    same global batch and seed (whitening each rank's own rows would not)."""
    root = runs / "reinforce"
    one, two = (load_file(root / name / "final" / "model.safetensors") for name in ("one", "two"))
    start = load_file(root / "policy" / "model.safetensors")
    assert any(not torch.equal(one[name], start[name]) for name in one)     # the runs trained
    worst = max((float((one[name] - two[name]).abs().max() / one[name].abs().max().clamp_min(1e-12)), name)
                for name in one)
    assert worst[0] <= 1e-4, f"max |diff| / max |w| of {worst[1]} is {worst[0]:.3g}"
