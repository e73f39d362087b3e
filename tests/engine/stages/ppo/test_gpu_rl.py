"""The RL stages end to end on CUDA (tiny models, seconds each): rollout through captured decode
graphs while training in the same process, on the GPU's kernels. Each is the CPU test of the same
feature moved onto the GPU (its configs reused, `train.device` set to cuda): GRPO with partial
rollouts, prefix sharing and speculative decoding; PPO with a separate critic; a 3-turn environment;
exact mode; LoRA GRPO; activation offload; the KV pool sized from free memory; the plan's
activation peak against the allocator's."""
import dataclasses
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.config.ppo import GRPOConfig, RolloutConfig
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.peft_io import WEIGHTS_FILE
from fusedrl.engine.plan.activations import shared_prefix_tokens, training_activations
from fusedrl.engine.plan.planner import plan_stage
from fusedrl.engine.stages.ppo.forwards import response_logprobs
from fusedrl.engine.stages.rollout.packs import pack_rollout
from fusedrl.engine.stages.ppo.trainer import train_ppo
from fusedrl.engine.train.runlog import read_metrics
from agent_testing import save_chat_model
from engine_testing import random_prompts
from reward_testing import vowel_fraction
from test_ppo import config as ppo_config, setup  # noqa: F401 (the fixture)
from test_ppo_exact import assert_exact
from test_partial import grpo as partial_grpo
from train_testing import save_tiny_model, write_jsonl

pytestmark = pytest.mark.gpu
CUDA = "cuda"
PROMPT, ANSWER, GROUP = 24, 8, 4  # the plan test's rows: a shared history, a short answer


def on_cuda(cfg, **train):
    """`cfg` run on the GPU (its train section's other fields kept)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=CUDA, **train))


def with_rollout(cfg, **rollout):
    return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, **rollout))


def records(cfg, kind="train"):
    return [r for r in read_metrics(cfg.output_dir) if r["kind"] == kind]


def test_grpo_with_partial_rollouts_and_speculative_decoding(setup):
    """The CPU test's budget (every answer takes two iterations) with n-gram drafts verified in
    one forward, on the GPU."""
    root, policy_dir, prompts = setup
    cfg = on_cuda(partial_grpo(root, policy_dir, prompts, "gpu-partial", max_staleness=1,
                               speculative_tokens=3, speculate_below=16))
    train_ppo(cfg)
    train = records(cfg)
    assert [(r["carried"], r["groups_trained"]) for r in train] == [(12, 0), (0, 2)], train
    assert train[1]["staleness_max"] == 1 and torch.isfinite(torch.tensor(train[1]["policy_loss"]))


def test_grpo_with_prefix_sharing(setup):
    """Each group's prompt forwarded once (varlen attention reading the shared keys) on the GPU."""
    root, policy_dir, prompts = setup
    cfg = with_rollout(on_cuda(partial_grpo(root, policy_dir, prompts, "gpu-share"),
                               prefix_sharing=True),
                       partial_rollouts=False, tokens_per_iteration=None)
    train_ppo(cfg)
    train = records(cfg)
    assert len(train) == 2 and all(r["forwarded_tokens"] < r["row_tokens"] for r in train), train


def test_ppo_with_a_separate_critic(setup):
    root, policy_dir, prompts = setup
    cfg = on_cuda(ppo_config(root, policy_dir, prompts, "gpu-critic", critic="separate"))
    final = train_ppo(cfg)
    train = records(cfg)
    assert len(train) == 2 and all(torch.isfinite(torch.tensor(r["value_loss"])) for r in train)
    start, end = load_model(policy_dir).state_dict(), load_model(final).state_dict()
    assert any(not torch.equal(start[k], end[k].to(start[k].dtype)) for k in start)


def test_an_environment_of_three_turns(tmp_path):
    model = save_chat_model(tmp_path / "chat")
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": "hello world"}, {"prompt": "the brown dog"}])
    cfg = GRPOConfig.from_dict({
        "policy": str(model), "prompts_file": str(prompts), "output_dir": str(tmp_path / "grpo"),
        "rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2, "max_new_tokens": 6,
                    "kv_cache_memory": 1 << 22, "max_prompt_length": 40,
                    "environment": "agent_envs:ThreeTurns", "max_turns": 3},
        "ppo": {"minibatch_size": 4}, "train": {"iterations": 2, "progress": False,
                                                "device": CUDA}})
    train_ppo(cfg)
    for r in records(cfg):
        assert r["turns/max"] <= 3 and r["turns/mean"] >= 2.5
        assert r["tokens/environment"] > r["tokens/model"] == r["tokens"] > 0


def test_exact_mode_rollout_logprobs_are_the_training_logprobs_bitwise(tmp_path):
    policy_dir = save_tiny_model(tmp_path / "policy", arch="qwen2")
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": "the quick brown"}, {"prompt": "lazy dog"}])
    base = ppo_config(tmp_path, policy_dir, prompts, "gpu-exact", critic="shared",
                      rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3,
                                            max_new_tokens=6, temperature=0.8, top_p=0.9,
                                            kv_cache_memory=1 << 22, block_size=4, exact=True))
    cfg = on_cuda(dataclasses.replace(base, ppo=dataclasses.replace(base.ppo, is_mode="tis")))
    train_ppo(cfg, reward_fn=vowel_fraction)
    assert_exact(records(cfg), 2)


def test_lora_grpo(setup):
    root, policy_dir, prompts = setup
    cfg = dataclasses.replace(
        on_cuda(partial_grpo(root, policy_dir, prompts, "gpu-lora")),
        lora=LoRAConfig(rank=4))
    cfg = with_rollout(cfg, partial_rollouts=False, tokens_per_iteration=None)
    final = train_ppo(cfg)
    assert len(records(cfg)) == 2
    adapters = load_file(pathlib.Path(cfg.output_dir) / "final_adapter" / WEIGHTS_FILE)
    assert adapters and all(torch.isfinite(a).all() for a in adapters.values())
    base, merged = load_model(policy_dir).state_dict(), load_model(final).state_dict()
    assert not all(torch.equal(base[k], merged[k].to(base[k].dtype)) for k in base)


def test_activation_offload(setup):
    root, policy_dir, prompts = setup
    cfg = on_cuda(ppo_config(root, policy_dir, prompts, "gpu-offload"),
                  gradient_checkpointing=True, activation_offload=True)
    train_ppo(cfg)
    train = records(cfg)
    assert len(train) == 2 and all(torch.isfinite(torch.tensor(r["policy_loss"])) for r in train)


def test_the_kv_pool_is_sized_from_the_plan_and_free_memory(setup):
    """rollout.kv_cache_memory=auto on CUDA: the pool the run allocates is the plan's (here the cap
    of prompts x samples full-length sequences), within what the GPU has free."""
    root, policy_dir, prompts = setup
    cfg = with_rollout(on_cuda(ppo_config(root, policy_dir, prompts, "gpu-pool")),
                       kv_cache_memory="auto")
    train_ppo(cfg)
    pool = records(cfg, "info")[0]["kv_pool_bytes"]
    total = torch.cuda.get_device_properties(0).total_memory
    planned = plan_stage(cfg, 1, total, advise=False, gpus_per_node=1).kv_pool
    assert pool == planned.bytes and 0 < pool < torch.cuda.mem_get_info()[0]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_plans_activation_peak_is_within_ten_percent_of_the_allocators(tmp_path, checkpointing):
    """One update forward + backward over 64 groups (8k tokens) on CUDA: the allocator's peak past
    what the model, its gradients and the first pass's workspaces hold, against the plan's fused
    rule for the same tokens."""
    model = load_model(save_tiny_model(tmp_path / "llama", arch="llama"), device=CUDA)
    model.set_recompute(checkpointing)
    groups = 64
    prompt_rows = [p for p in random_prompts([PROMPT] * groups) for _ in range(GROUP)]
    packed = pack_rollout(prompt_rows, random_prompts([ANSWER] * groups * GROUP, seed=1), CUDA)
    tokens, keys = shared_prefix_tokens(groups * GROUP, GROUP, PROMPT, ANSWER, False)

    def step():
        response_logprobs(model, packed, 1.0)[0].sum().backward()
    step()  # gradients, cuBLAS workspace and Triton's first launches: held before the measure
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    step()
    peak = torch.cuda.max_memory_allocated() - held
    plan = training_activations(model.config, 4, checkpointing, tokens, True, shared_keys=keys,
                                fused=True)
    assert abs(plan - peak) <= 0.10 * peak, (plan, peak)
