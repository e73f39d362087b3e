"""train.expert_parallel: SFT of a tiny Qwen3-MoE with its experts sharded over 2 gloo ranks (each
rank 4 of the 8 experts, tokens sent by all-to-all in fixed-capacity buffers that drop nothing)
gives one process's weights and curves with the same global batch, also stopped and resumed from the checkpoint that holds each rank's experts; its
export reloads in transformers; GRPO, each rank gathering the experts to generate its own prompts,
equals the same 2 ranks with the experts sharded by FSDP (curves, exported weights); on 4 ranks in
expert groups of 2 (each shard on 2 replicas) SFT equals one process too; the refusals are one line
each."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers

from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig, RolloutConfig, _grpo_update
from fusedrl.engine.config import io as config_io
from fusedrl.engine.errors import UsageError
from fusedrl.engine.model.hf_io import load_model, save_model
from fusedrl.engine.parallel.validate import refuse_expert_parallel
from fusedrl.engine.plan.phases import weight_bytes
from fusedrl.engine.plan.planner import stage_setup
from fusedrl.engine.stages.sft import train_sft
from fusedrl.engine.train.checkpoint import checkpoint_dir
from fusedrl.engine.train.runlog import read_metrics
from dist_testing import check, rank_threads, run_ranks, stage_run, torchrun_runs
from moe_testing import make_moe_model, save_moe_base
from test_data_parallel import assert_same_curves, assert_same_weights
from train_testing import demonstrations, rm_config, save_tiny_model, sft_config, write_jsonl


def sft_run(root, name, ranks, steps=2, capacity=0.0):
    return sft_config(root / "base", root / "train.jsonl", root / name,
                      optim={"grad_accum_steps": 2} if ranks == 1 else {},
                      train={"max_steps": steps, "device": "cpu", "precision": "fp32", "save_every": 1,
                             "expert_parallel": ranks, "gradient_checkpointing": ranks > 1,
                             "expert_capacity_factor": capacity})


def grpo_run(root, name, experts):
    return GRPOConfig(policy=str(root / "policy"), prompts_file=str(root / "prompts.jsonl"),
                      output_dir=str(root / name),
                      reward_fn="reward_testing:vowel_fraction",
                      rollout=RolloutConfig(prompts_per_iteration=1, samples_per_prompt=3, max_new_tokens=6,
                                            kv_cache_memory=1 << 22),
                      ppo=dataclasses.replace(_grpo_update(), epochs=1, minibatch_size=3),
                      train=LoopConfig(iterations=2, progress=False, device="cpu", precision="fp32",
                                       expert_parallel=experts))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The module's 2-rank runs in one launch: SFT with the experts sharded (sft/two), stopped
    after step 1 and resumed; GRPO with the experts sharded (grpo/ep) and by FSDP (grpo/fsdp)."""
    root = tmp_path_factory.mktemp("ep_two_ranks")
    sft, grpo = root / "sft", root / "grpo"
    save_moe_base(sft / "base", "qwen3_moe")
    write_jsonl(sft / "train.jsonl", demonstrations(16))
    save_moe_base(grpo / "policy")
    write_jsonl(grpo / "prompts.jsonl", [{"prompt": p} for p in ["the quick brown", "hello world", "lazy dog",
                                                                  "fox jumps"]])
    # The 2 ranks recompute each layer in backward (its all-to-alls again, in the same order on both).
    # Stopped after step 1 and resumed: each rank's experts and their Adam moments come back. They
    # exchange fixed-capacity buffers of factor 2 (= the ranks: nothing dropped, the same result;
    # the variable splits: the other tests).
    check(torchrun_runs([stage_run("sft", sft_run(sft, "two", 2, steps=1, capacity=2.0)),
                         stage_run("sft", sft_run(sft, "two", 2, capacity=2.0)),
                         stage_run("grpo", grpo_run(grpo, "ep", 2)),
                         stage_run("grpo", grpo_run(grpo, "fsdp", 1))], root))
    return root


def test_expert_parallel_sft_two_ranks_match_one_process(two_ranks):
    root = two_ranks / "sft"
    chunks = json.loads((checkpoint_dir(root / "two", 1) / "checkpoint.json").read_text())[
        "tensors"]["models.model.model.layers.1.mlp.experts.down_proj"]["chunks"]
    assert [(c["file"], c["offsets"][0], c["sizes"][0]) for c in chunks] == [
        ("rank-00000.safetensors", 0, 4), ("rank-00001.safetensors", 4, 4)]
    assert [r.get("expert_dropped") for r in read_metrics(root / "two") if r["kind"] == "train"] == [0, 0]
    resumed = [r["resumed_from"] for r in read_metrics(root / "two") if r.get("resumed_from")]
    assert len(resumed) == 1 and resumed[0].endswith("step-00000001")  # the second run: from step 1
    with rank_threads():
        train_sft(sft_run(root, "one", 1))
    assert_same_weights(root / "two" / "final", root / "one" / "final", rtol=1e-4)
    assert_same_curves(root / "two", root / "one")
    ids = torch.arange(3, 19).view(2, 8)
    logits = [transformers.Qwen3MoeForCausalLM.from_pretrained(root / name / "final").eval()(ids).logits
              for name in ("two", "one")]
    assert (logits[0] - logits[1]).abs().max() <= 1e-4 * logits[1].abs().max()


def test_expert_groups_four_ranks_match_one_process(tmp_path):
    """4 ranks in 2 expert groups of 2 (each expert shard on 2 ranks): SFT equals one process with
    the global batch in 4 accumulated micro-batches (64 examples: the groups see different rows); each shard checkpointed once; the export the
    bytes one process writes; the sharded load, gathered_experts and the plan's weight bytes checked on
    the ranks (ep_groups_worker)."""
    base = save_moe_base(tmp_path / "base", "qwen3_moe")
    write_jsonl(tmp_path / "train.jsonl", demonstrations(64))

    def run(name, ranks):
        return sft_config(base, tmp_path / "train.jsonl", tmp_path / name,
                          optim={"grad_accum_steps": 4} if ranks == 1 else {},
                          train={"max_steps": 2, "device": "cpu", "precision": "fp32", "save_every": 1,
                                 "expert_parallel": 2 if ranks > 1 else 1})

    config_io.save_yaml(run("four", 4), tmp_path / "four.yaml")
    result = run_ranks(Path(__file__).with_name("ep_groups_worker.py"), tmp_path / "four.yaml",
                       tmp_path, nproc=4)
    check(result)
    with rank_threads():
        train_sft(run("one", 1))
    assert_same_weights(tmp_path / "four" / "final", tmp_path / "one" / "final", rtol=1e-4)
    assert_same_curves(tmp_path / "four", tmp_path / "one")
    chunks = json.loads(sorted((tmp_path / "four" / "checkpoints").glob("step-*/checkpoint.json"))[-1].read_text())[
        "tensors"]["models.model.model.layers.1.mlp.experts.down_proj"]["chunks"]
    assert [(c["file"], c["offsets"][0], c["sizes"][0]) for c in chunks] == [
        ("rank-00000.safetensors", 0, 4), ("rank-00001.safetensors", 4, 4)]  # ranks 2, 3: the replicas
    save_model(load_model(tmp_path / "four" / "final"), tmp_path / "resaved")
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "resaved" / name).read_bytes() == (tmp_path / "four" / "final" / name).read_bytes()
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["local_rows"] for r in report] == [[4]] * 4  # 8 experts over groups of 2
    assert max(r["gathered_error"] for r in report) <= 1e-6
    assert report[0]["weight_bytes"] == weight_bytes(stage_setup(run("four", 4), 4))  # the plan: rank 0's


def test_grpo_expert_parallel_equals_fsdp_experts(two_ranks):
    root = two_ranks / "grpo"
    # The GRPO loss is near 0 (-9e-8): its rounding is compared through the gradient norm instead.
    assert_same_curves(root / "ep", root / "fsdp", keys=("grad_norm", "reward_mean"))
    # GRPO's small steps move the experts by 2.5e-5 of max|w| in 2 iterations; the two runs differ by 7e-9.
    assert_same_weights(root / "ep" / "final", root / "fsdp" / "final", rtol=1e-6)


@pytest.mark.parametrize("expert_parallel, gpus, extra, message", [
    (4, 6, {}, "expected a divisor of the world size 6"),
    (3, 3, {}, "expected a divisor of the model's 8 experts"),
    (2, 2, {"dense": True}, "is a dense model"),
    (2, 2, {"rm": True}, "only SFT, PPO and GRPO"),
])
def test_expert_parallel_refusals(tmp_path, expert_parallel, gpus, extra, message):
    if extra.pop("dense", False):
        base = save_tiny_model(tmp_path / "dense")
    else:
        base = tmp_path / "moe"
        make_moe_model("qwen3_moe").save_pretrained(base)
    stage_config = rm_config if extra.pop("rm", False) else sft_config
    cfg = stage_config(base, tmp_path / "train.jsonl", tmp_path / "out", train={"expert_parallel": expert_parallel},
                       **extra)
    with pytest.raises(UsageError, match=f"train.expert_parallel={expert_parallel}: .*{message}"):
        refuse_expert_parallel(cfg.parallel_job(), gpus)


def test_capacity_factor_refusals(tmp_path):
    """train.expert_capacity_factor: a finite number >= 0, read beside train.expert_parallel > 1."""
    make_moe_model("qwen3_moe").save_pretrained(tmp_path / "moe")

    def cfg(factor, experts=1):
        return sft_config(tmp_path / "moe", tmp_path / "train.jsonl", tmp_path / "out",
                          train={"expert_parallel": experts, "expert_capacity_factor": factor})

    refuse_expert_parallel(cfg(1.5, experts=2).parallel_job(), 2)
    with pytest.raises(UsageError, match=r"^train.expert_capacity_factor=1.5 with train.expert_parallel=1: "
                                         "expected train.expert_parallel > 1"):
        refuse_expert_parallel(cfg(1.5).parallel_job(), 2)
    with pytest.raises(ValueError, match="train.expert_capacity_factor must be a finite number >= 0, got -1"):
        cfg(-1)
