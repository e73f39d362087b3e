"""Partial rollouts (rollout.partial_rollouts, stages/rollout/partial.py) on a tiny model: answers
carried across iterations under a small token budget, groups trained whole, no token older than
rollout.max_staleness, and a resumed run equal to the uninterrupted one."""
import dataclasses

import pytest
import torch

from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.inference.in_flight import Group
from fusedrl.engine.stages.rollout.partial import drop_stale, new_groups_wanted
from fusedrl.engine.stages.ppo.update import UpdateSettings
from fusedrl.engine.train.runlog import read_metrics
from fusedrl.kernels import use_backend
from test_ppo import run_straight_and_resumed, setup  # noqa: F401 (the fixture)
from train_testing import checkpoint_data


def grpo(root, policy_dir, prompts, run, **rollout):
    # 6-token answers (EOS ignored), 4 groups of 3 in flight, all 12 rows at once: a 26-token
    # budget draws 3 tokens a row per iteration (its third step passes it), so every answer takes
    # two iterations.
    rollout = RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3, max_new_tokens=6,
                            ignore_eos=True, kv_cache_memory=1 << 22, partial_rollouts=True,
                            tokens_per_iteration=26, **rollout)
    return GRPOConfig(policy=str(policy_dir), prompts_file=str(prompts), output_dir=str(root / run),
                      reward_fn="reward_testing:vowel_fraction", rollout=rollout,
                      ppo=UpdateConfig(estimator="grpo", epochs=1, minibatch_size=3, vf_coef=0.0,
                                       kl_loss_coef=0.01),
                      train=LoopConfig(iterations=2, save_every=1, keep_checkpoints=0,
                                       progress=False, device="cpu"))


def test_answers_carry_train_within_the_staleness_bound_and_resume_exactly(setup):
    """Iteration 1 cuts every answer at the budget (carried, nothing trained); iteration 2
    completes all four groups and trains two, their first tokens one iteration old
    (max_staleness=1). The checkpoint after iteration 1 holds the answers in flight: the same
    weights straight or resumed."""
    root, policy_dir, prompts = setup
    with use_backend("torch"):  # on the CPU: the carrying is under test, not the kernels
        a, b = run_straight_and_resumed(
            root, lambda run: grpo(root, policy_dir, prompts, run, max_staleness=1), "partial")
    assert all(torch.equal(a[k], b[k]) for k in a)
    train = [r for r in read_metrics(root / "straight-partial") if r["kind"] == "train"]
    assert [(r["carried"], r["groups_trained"]) for r in train] == [(12, 0), (0, 2)], train
    assert "policy_loss" in train[1] and [r["staleness_max"] for r in train] == [0, 1]
    # 3 of each trained answer's 6 tokens were drawn the iteration before.
    assert train[1]["staleness_mean"] == pytest.approx(0.5)
    # The step that spends the budget ends the rollout: at most a step of 12 rows past it.
    assert all(r["budget_used"] <= (26 + 12) / 26 and r["dropped_answers"] == 0 for r in train)
    saved = checkpoint_data(root / "straight-partial" / "checkpoints" / "step-00000001")
    in_flight = saved["loop"]["in_flight"]
    assert len(in_flight) == 4 and all(
        len(s["answer"]) == len(s["logprobs"]) == len(s["versions"]) == 3
        for g in in_flight for s in g["samples"])


def test_an_iteration_that_generates_nothing_trains_the_groups_already_complete(setup, tmp_path):
    """Iteration 2 completes all four groups and trains two; iteration 3 tops up two new groups
    but needs no generation (two complete groups wait): it trains them and logs no generation
    throughput, as it generated nothing."""
    from fusedrl.engine.stages.ppo.trainer import train_ppo
    root, policy_dir, prompts = setup
    cfg = grpo(tmp_path, policy_dir, prompts, "idle", max_staleness=2)
    train_ppo(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, iterations=3)))
    train = [r for r in read_metrics(tmp_path / "idle") if r["kind"] == "train"]
    assert [(r["groups_trained"], r["drawn_tokens"]) for r in train][1:] == [(2, 36), (2, 0)]
    assert "policy_loss" in train[2] and "tokens_per_s_generate" not in train[2]
    assert train[1]["tokens_per_s_generate"] > 0


def test_stale_answers_are_dropped_and_sampled_again():
    group = Group.new([1, 2], 2, seed=5)
    old, fresh = group.samples
    old.tokens, old.logprobs, old.versions, old.finish = [7, 8], [-1.0, -2.0], [3, 4], "stop"
    fresh.tokens, fresh.logprobs, fresh.versions = [9], [-0.5], [5]
    assert drop_stale([group], iteration=6, max_staleness=2) == (1, 2)
    assert old.tokens == [] and old.finish is None and fresh.tokens == [9]
    assert old.seed != fresh.seed


def test_partial_rollouts_turn_the_is_correction_on_and_refuse_what_cannot_carry():
    base = dict(policy="p", prompts_file="f", output_dir="o", reward_fn="m:f")
    on = GRPOConfig(**base, rollout=RolloutConfig(samples_per_prompt=2, partial_rollouts=True))
    assert UpdateSettings.of(on).ppo.is_mode == "tis" and on.rollout.max_rows == 2 * 16 * 2
    assert UpdateSettings.of(GRPOConfig(**base)).ppo.is_mode is None
    off = GRPOConfig(**base, rollout=RolloutConfig(samples_per_prompt=2, partial_rollouts=True),
                     ppo=UpdateConfig(estimator="grpo", is_mode="off"))
    assert UpdateSettings.of(off).ppo.is_mode is None
    wanted = [new_groups_wanted(carried, 16) for carried in (0, 10, 16, 30, 40)]
    assert wanted == [32, 22, 16, 2, 0]
    with pytest.raises(ValueError, match=r"^rollout.partial_rollouts=True with rollout.exact=True: "):
        GRPOConfig(**base, rollout=RolloutConfig(partial_rollouts=True, exact=True))


def test_two_ranks_carry_answers_and_train_whole_groups_in_step(setup):
    """torchrun, 2 gloo ranks, each with its own prompts and the one-process test's budget: both
    cut every answer in iteration 1 (carried, nothing trained: the ranks agree the iteration is
    over) and both train two whole groups in iteration 2, no token older than max_staleness."""
    from dist_testing import check, torchrun
    root, policy_dir, prompts = setup
    check(torchrun("grpo", grpo(root, policy_dir, prompts, "ranks", max_staleness=1), root, timeout=600))
    rows = read_metrics(root / "ranks")
    assert rows[0]["world_size"] == 2
    train = [r for r in rows if r["kind"] == "train"]
    assert [(r["carried"], r["groups_trained"]) for r in train] == [(24, 0), (0, 4)], train
    assert [r["staleness_max"] for r in train] == [0, 1] and "policy_loss" in train[1]
    assert all(r["dropped_answers"] == 0 for r in train)
    assert (root / "ranks" / "final" / "config.json").exists()


@pytest.mark.parametrize("policy", ["lora", "moe"])
def test_lora_and_moe_policies_carry_answers(setup, tmp_path, policy):
    """Partial rollouts with LoRA adapters (the sampler generates through them) and with an MoE
    policy (routing replay on: a carried answer routed as the forwards of the iteration that
    completed it) carry every answer over iteration 1 and train whole groups in iteration 2."""
    from fusedrl.engine.config.lora import LoRAConfig
    from fusedrl.engine.stages.ppo.trainer import train_ppo
    from moe_testing import make_moe_model
    from train_testing import make_tokenizer
    root, policy_dir, prompts = setup
    if policy == "moe":
        policy_dir = tmp_path / "moe-policy"
        make_moe_model("qwen3_moe").save_pretrained(policy_dir)
        make_tokenizer().save_pretrained(policy_dir)
    cfg = grpo(tmp_path, policy_dir, prompts, policy, max_staleness=1)
    if policy == "lora":
        cfg = dataclasses.replace(cfg, lora=LoRAConfig(rank=4))
    train_ppo(cfg)
    train = [r for r in read_metrics(tmp_path / policy) if r["kind"] == "train"]
    assert [(r["carried"], r["groups_trained"]) for r in train] == [(12, 0), (0, 2)], train
    assert "policy_loss" in train[1]
    # every token of the 6 rows but each one's last has the sampler's records
    assert train[1].get("routing/replayed_tokens", 0) == (
        train[1]["row_tokens"] - 6 if policy == "moe" else 0)
