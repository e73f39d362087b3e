"""SFT and RM tensor-parallel under torchrun (engine/tensor_parallel.py, gloo CPU ranks): each rank
trains its own slices of the weights through the differentiable collectives and the
vocabulary-parallel log-prob, and the exported model equals one process's with the same global
batch: SFT on 2 ranks at T=2, and on 4 ranks at T=2 x 2 data groups against one process with
optim.grad_accum_steps=2, the slices sharded over the data groups by FSDP2 (train.data_parallel=shard:
each rank's checkpoint chunk of a weight and of its optimizer state is a quarter; resumed on 2 ranks
at T=2) or copied there (replicate; recomputing each layer in backward; launched as 2 "nodes" of 2
ranks, each node a tensor group); RM (a whole score head, the LM term through the
vocabulary-parallel log-prob) on 2 ranks at T=2."""
import json
import math

import pytest
from safetensors.torch import load_file

from fusedrl.engine.train.checkpoint.restore import CheckpointMismatch
from fusedrl.engine.stages.rm import train_rm
from fusedrl.engine.stages.sft import train_sft
from fusedrl.engine.train.runlog import read_metrics
from dist_testing import check, rank_0_call, rank_threads, stage_run, torchrun, torchrun_nodes, torchrun_runs
from train_testing import (copy_checkpoint, demonstrations, rm_config, save_tiny_model, sft_config,
                           sorted_digit_preferences, write_jsonl)

# fp32: a tensor-parallel GEMM sums its slices in another order, which bf16 weights round to a
# different last place; in fp32 the difference stays at rounding.
LOOP = {"max_steps": 3, "device": "cpu", "precision": "fp32"}


def max_relative_diff(dir_a, dir_b, skip: str | None = None) -> float:
    """max |a - b| / max |a| over every tensor of two exported models but those whose name ends
    with `skip`."""
    a, b = load_file(dir_a / "model.safetensors"), load_file(dir_b / "model.safetensors")
    assert a.keys() == b.keys()
    return max(((a[k].float() - b[k].float()).abs().max() / a[k].float().abs().max()).item()
               for k in a if skip is None or not k.endswith(skip))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_tp")
    # Tied embedding and head (one vocabulary-parallel parameter used twice); 4 key/value heads. No
    # k_proj bias: its true gradient is 0 (softmax ignores it), so Adam turns rounding into lr-sized steps.
    base = save_tiny_model(root / "base", arch="llama2", tie_word_embeddings=True)
    write_jsonl(root / "train.jsonl", demonstrations(24))
    write_jsonl(root / "pairs.jsonl", sorted_digit_preferences(16))

    def config(name, accum, t=1, **loop):
        # Adam's eps 1e-6 (not 1e-8): an element whose gradient is near 0 (rounding noise where the
        # slices sum in another order) would otherwise take an update of order lr; with 1e-8 one q_proj
        # element of 4096 differs by 1.2e-4 of max |w| after 3 steps at T=2 x 2, the rest below 1e-5.
        return sft_config(base, root / "train.jsonl", root / name, optim={"grad_accum_steps": accum, "eps": 1e-6},
                          train={**LOOP, "tensor_parallel": t, **loop})
    check(torchrun("sft", config("t2dp2", 1, 2, save_every=2), root, nproc=4, timeout=400))
    # With each layer recomputed in backward (collectives included), as the one process is not; as 2
    # "nodes" of 2 ranks (the multi-node recipe): a tensor group is one node, the data groups hold
    # copies and their gradient average is what crosses the nodes.
    check(torchrun_nodes("sft", config("t2dp2_copies", 1, 2, gradient_checkpointing=True,
                                       data_parallel="replicate"), root, timeout=400))

    def reward_config(name, t=1):
        return rm_config(base, root / "pairs.jsonl", root / name, beta_rm=0.1, data={"tokens_per_batch": 128},
                         optim={"eps": 1e-6}, train={**LOOP, "max_steps": 2, "tensor_parallel": t})
    # The 2-rank runs in one launch: the 4-rank run's step-2 checkpoint resumed at T=2 x 1 data group.
    check(torchrun_runs([stage_run("sft", config("t2", 1, 2, save_every=2)),
                         rank_0_call(copy_checkpoint, root / "t2dp2", 2, root / "t2dp2_resumed_t2"),
                         stage_run("sft", config("t2dp2_resumed_t2", 2, 2)),
                         stage_run("rm", reward_config("rm_t2", 2))], root, timeout=600))
    with rank_threads():
        train_sft(config("one", 1))
        train_sft(config("one_accum2", 2))
        train_rm(reward_config("rm_one"))
    return root


def test_two_tensor_ranks_train_one_process_s_weights(runs):
    assert max_relative_diff(runs / "one" / "final", runs / "t2" / "final") <= 1e-4
    one, two = ([r for r in read_metrics(runs / name) if r["kind"] == "train"] for name in ("one", "t2"))
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-5)
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]


def test_a_checkpoint_resumes_only_at_its_tensor_parallel_size(runs, tmp_path):
    """Its packed rows are rank-interleaved: read at T=1 they would be other heads' rows."""
    copy_checkpoint(runs / "t2", 2, tmp_path / "resumed")
    cfg = sft_config(runs / "base", runs / "train.jsonl", tmp_path / "resumed", train=LOOP)
    with pytest.raises(CheckpointMismatch, match="its model rows are laid out for train.tensor_parallel=2, this "
                                                 "run's for 1"):
        train_sft(cfg)


@pytest.mark.parametrize("run", ["t2dp2", "t2dp2_copies", "t2dp2_resumed_t2"])
def test_two_tensor_ranks_by_two_data_groups_train_one_process_s_weights(runs, run):
    assert max_relative_diff(runs / "one_accum2" / "final", runs / run / "final") <= 1e-4
    one, four = ([r for r in read_metrics(runs / name) if r["kind"] == "train"] for name in ("one_accum2", run))
    assert [r["loss"] for r in four] == pytest.approx([r["loss"] for r in one[-len(four):]], rel=1e-5)
    assert [r["grad_norm"] for r in four] == pytest.approx([r["grad_norm"] for r in one[-len(four):]], rel=1e-5)
    assert [r["step"] for r in four] == ([3] if run == "t2dp2_resumed_t2" else [1, 2, 3])  # resumed at step 2


def test_sharded_over_the_data_groups_each_rank_holds_a_quarter(runs):
    """At train.data_parallel=shard each of the 4 ranks saves its own chunk of every sliced weight and
    of its optimizer state (a quarter: its half of its tensor slice), and of each norm its data half
    (the tensor ranks' copies saved once)."""
    tensors = json.loads((runs / "t2dp2" / "checkpoints" / "step-00000002" / "checkpoint.json").read_text())["tensors"]
    for name, parts in (("layers.0.self_attn.qkv_proj.weight", 4), ("layers.1.mlp.down_proj.weight", 4),
                        ("embed_tokens.weight", 4), ("layers.0.input_layernorm.weight", 2)):
        for key in (f"models.model.model.{name}", f"optimizers.0.model.model.{name}.exp_avg"):
            entry = tensors[key]
            assert [math.prod(c["sizes"]) for c in entry["chunks"]] == [math.prod(entry["shape"]) // parts] * parts, key


def test_a_reward_model_trains_tensor_parallel(runs):
    assert max_relative_diff(runs / "rm_one" / "final", runs / "rm_t2" / "final") <= 1e-4
    one, two = ([r for r in read_metrics(runs / name) if r["kind"] == "train"] for name in ("rm_one", "rm_t2"))
    for key in ("loss", "accuracy", "lm_nll"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5), key
    offsets = [r["reward_offset"] for run in ("rm_one", "rm_t2") for r in read_metrics(runs / run) if "reward_offset" in r]
    assert offsets[0] == pytest.approx(offsets[1], rel=1e-4)
