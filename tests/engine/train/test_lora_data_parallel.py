"""LoRA under torchrun (2 CPU ranks over gloo): the frozen base whole on every rank, the adapters'
gradients averaged over the ranks. SFT on two ranks gives one process's adapters on the same global
batch, and its checkpoint resumes in one process; PPO with LoRA on the policy and on the critic
(sharing the reward model's decoder) runs, checkpoints and exports on two ranks."""

import torch
from safetensors.torch import load_file

from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.config.ppo import LoopConfig, PPOConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.peft_io import WEIGHTS_FILE
from fusedrl.engine.model.reward_model import reward_model_from_lm, save_reward_model
from fusedrl.engine.stages.sft import train_sft
from fusedrl.engine.train.checkpoint import checkpoint_dir, read_tensors
from fusedrl.engine.train.runlog import read_metrics
from dist_testing import check, rank_threads, stage_run, torchrun_runs
from train_testing import checkpoint_data, copy_checkpoint, demonstrations, save_tiny_model, sft_config, write_jsonl

LORA = LoRAConfig(rank=4, alpha=8.0, target_modules="q_proj,v_proj,gate_proj,down_proj")


def test_lora_on_two_ranks(tmp_path):
    base = save_tiny_model(tmp_path / "base", arch="llama2")
    write_jsonl(tmp_path / "train.jsonl", demonstrations(24))

    def sft(name, ranks):  # the same global batch of 2 micro-batches; fp32, so only the sum order differs
        return sft_config(base, tmp_path / "train.jsonl", tmp_path / name, lora=LORA,
                          optim={"grad_accum_steps": 2} if ranks == 1 else {},
                          train={"max_steps": 3, "save_every": 2, "device": "cpu", "precision": "fp32"})
    rm = reward_model_from_lm(load_model(base))
    torch.nn.init.normal_(rm.score.weight, std=0.3)
    save_reward_model(rm, tmp_path / "rm", source_dir=base)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ["the quick brown", "hello world", "lazy dog"]])
    ppo = PPOConfig(policy=str(base), reward_model=str(tmp_path / "rm"), prompts_file=str(tmp_path / "prompts.jsonl"),
                    output_dir=str(tmp_path / "ppo"), critic="separate", lora=LORA, critic_lora=LORA,
                    rollout=RolloutConfig(prompts_per_iteration=1, samples_per_prompt=3, max_new_tokens=6,
                                          kv_cache_memory=1 << 22),
                    ppo=UpdateConfig(epochs=1, minibatch_size=3),
                    train=LoopConfig(iterations=2, save_every=1, progress=False, device="cpu"))
    # One launch: SFT, then PPO with adapters on the policy and the critic.
    check(torchrun_runs([stage_run("sft", sft("two", 2)), stage_run("ppo", ppo)], tmp_path))
    with rank_threads():
        train_sft(sft("one", 1))
    two, one = (load_file(tmp_path / run / "final_adapter" / WEIGHTS_FILE) for run in ("two", "one"))
    first, last = (read_tensors(checkpoint_dir(tmp_path / "one", step), "models.adapter.") for step in (2, 3))
    assert two.keys() == one.keys() and not all(torch.equal(last[k], first[k]) for k in last)
    for name in one:
        assert (two[name] - one[name]).abs().max() <= 1e-5 * one[name].abs().max(), name
    rows = [r for r in read_metrics(tmp_path / "two") if r["kind"] == "train"]
    assert len(rows) == 3 and all(len(r["tokens_per_rank"]) == 2 for r in rows)
    # The two ranks' checkpoint (the replicated adapters written once, by rank 0) resumes in one process.
    index = checkpoint_data(checkpoint_dir(tmp_path / "two", 2))["tensors"]
    assert {c["file"] for name, entry in index.items() if name.startswith("models.adapter.")
            for c in entry["chunks"]} == {"rank-00000.safetensors"}
    copy_checkpoint(tmp_path / "two", 2, tmp_path / "resumed")
    with rank_threads():
        train_sft(sft("resumed", 1))
    resumed = load_file(tmp_path / "resumed" / "final_adapter" / WEIGHTS_FILE)
    for name in one:
        assert (resumed[name] - one[name]).abs().max() <= 1e-5 * one[name].abs().max(), name

    rows = [r for r in read_metrics(tmp_path / "ppo") if r["kind"] == "train"]
    assert len(rows) == 2 and all(r["updates"] > 0 for r in rows)
    assert [r["world_size"] for r in read_metrics(tmp_path / "ppo") if "world_size" in r] == [2]
    for adapter in ("final_adapter", "final_critic_adapter"):
        assert (tmp_path / "ppo" / adapter / WEIGHTS_FILE).exists(), adapter
    assert checkpoint_dir(tmp_path / "ppo", 2).is_dir()
