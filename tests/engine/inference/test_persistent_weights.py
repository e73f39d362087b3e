"""Persistent gathered weights (rollout.persistent_weights, inference/persistent_weights.py): on 2
gloo ranks, in one torchrun launch of persistent_worker.py, generation from buffers allocated once
and refilled in place equals the unshard path's across two rollouts with a training step between
them (buffers' storage unchanged, uneven shards and a tied head included), in replicate mode with no
buffer at all, in the batch-invariant mode on a LoRA-adapted policy, with expert-parallel experts;
and a GRPO run with the option ends with the weights of the run without it. The option is refused
in one line where nothing is gathered; on 2 GPUs, the decode steps replay from CUDA graphs across
rollouts."""
from pathlib import Path

import pytest
import torch

from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig, RolloutConfig
from fusedrl.engine.errors import ConfigValueError, UsageError
from fusedrl.engine.inference.hybrid_actor import HybridActor
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.plan.check import refuse_unfit
from dist_testing import check, run_ranks
from moe_testing import make_moe_model
from train_testing import save_tiny_model, write_jsonl

WORKER = Path(__file__).with_name("persistent_worker.py")


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    # A vocabulary of 301 rows: the tied embedding / LM head shards unevenly (151 + 150 rows).
    return save_tiny_model(tmp_path_factory.mktemp("persistent") / "policy", "qwen2", tie_word_embeddings=True,
                           vocab_size=301)


def test_two_ranks_generate_from_persistent_buffers_as_from_unshard(dense_dir):
    root = dense_dir.parent
    make_moe_model("qwen3_moe").save_pretrained(root / "moe")
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in ["the quick brown", "hello world", "lazy dog",
                                                                  "fox jumps"]])
    # The engine's wiring under test, not the kernels: their torch references, not interpreted Triton.
    result = run_ranks(WORKER, "cpu", dense_dir, root / "moe", root,
                       env={"FUSEDRL_BACKEND": "torch"})
    check(result)
    assert [line.split(",")[0] for line in result.stdout.splitlines() if line.startswith("ok ")] == [
        "ok rollouts cpu", "ok replicate", "ok exact lora", "ok experts", "ok grpo"], result.stdout


def test_persistent_weights_where_nothing_is_gathered_is_refused_in_one_line(qwen2_dir):
    with pytest.raises(ConfigValueError, match=r"^persistent_weights=True: expected torchrun at tensor_parallel 1 "
                                               r"or tensor slices sharded over the data groups \(got one process, "
                                               r"which gathers nothing\)$"):
        HybridActor(load_model(qwen2_dir), kv_cache_memory=1 << 20, persistent_weights=True)
    cfg = GRPOConfig(policy="p", prompts_file="f", output_dir="o",
                     rollout=RolloutConfig(persistent_weights=True), train=LoopConfig(device="cpu"))
    with pytest.raises(UsageError, match=r"^rollout.persistent_weights=true .* expected torchrun at "
                                         r"train.tensor_parallel=1, or tensor slices sharded over the data groups "
                                         r"\(got one process, which gathers nothing\)$"):
        refuse_unfit(cfg, torch.device("cpu"), 1)
    cfg.train.tensor_parallel = 2
    with pytest.raises(UsageError, match=r"\(got train.tensor_parallel=2 on 2 GPUs at train.data_parallel=shard, "
                                         r"which gathers nothing\)$"):
        refuse_unfit(cfg, torch.device("cpu"), 2)
    cfg.train.data_parallel = "replicate"
    with pytest.raises(UsageError, match=r"\(got train.tensor_parallel=2 on 4 GPUs at train.data_parallel=replicate, "
                                         r"which gathers nothing\)$"):
        refuse_unfit(cfg, torch.device("cpu"), 4)
    cfg.train.data_parallel = "shard"
    refuse_unfit(cfg, torch.device("cpu"), 4)  # 2 data groups shard the slices: gathered, so kept


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two ranks need 2 GPUs")
def test_two_gpus_replay_decode_graphs_over_persistent_buffers_across_rollouts(dense_dir):
    """The decode steps captured once over the buffers and replayed in two rollouts with a training
    step between them (not yet run: no machine with 2 GPUs so far)."""
    result = run_ranks(WORKER, "cuda", dense_dir)
    check(result)
    assert "ok rollouts cuda" in result.stdout, result.stdout
