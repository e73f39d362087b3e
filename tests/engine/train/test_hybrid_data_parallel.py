"""Several nodes as 2 "nodes" x 2 gloo ranks on this machine: two torchrun launches joined by torchrun's
static rendezvous (`--nnodes 2 --node-rank 0/1 --master-addr 127.0.0.1 --master-port P`, the README's
multi-node recipe). SFT with train.data_parallel=hybrid (HSDP: each node's 2 ranks shard the model,
the 2 nodes hold whole copies, the gradients crossing them once per step) ends with the weights of
one process whose accumulation makes the same global batch; its checkpoint holds each tensor in 2
chunks (the shard group: one node), written by node 0's ranks alone, and resumes in one process;
its streamed export is the bytes one process writes for the same weights."""
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fusedrl.engine.parallel.dims import shard_group_size
from fusedrl.engine.errors import ConfigValueError
from fusedrl.engine.model.hf_io import load_model, save_model
from fusedrl.engine.stages.sft import train_sft
from fusedrl.engine.train.checkpoint import checkpoint_dir
from fusedrl.engine.train.runlog import read_metrics
from dist_testing import check, rank_threads, torchrun_nodes
from test_data_parallel import assert_same_curves
from test_tensor_parallel_training import max_relative_diff
from train_testing import checkpoint_data, copy_checkpoint, demonstrations, save_tiny_model, sft_config, write_jsonl

NODES, PER_NODE, ACCUM = 2, 2, 2
# fp32: the 4 ranks sum the gradients in another order than one process; in fp32 that stays rounding.
LOOP = {"max_steps": 2, "device": "cpu", "precision": "fp32"}


def config(root, name, accum, **loop):
    return sft_config(root / "base", root / "train.jsonl", root / name, optim={"grad_accum_steps": accum, "eps": 1e-6},
                      train={**LOOP, **loop})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hsdp")
    # Tied embeddings (one FSDP parameter used twice); no k_proj bias (its true gradient is 0, and
    # Adam would turn the rounding of the other summation order into lr-sized steps).
    save_tiny_model(root / "base", arch="llama2", tie_word_embeddings=True)
    write_jsonl(root / "train.jsonl", demonstrations(24))
    # 2 micro-batches per rank: the first backward of a step reduce-scatters within the node only,
    # the second adds it into the one all-reduce across the nodes (distributed.all_reduce_in_backward).
    check(torchrun_nodes("sft", config(root, "hybrid", ACCUM, data_parallel="hybrid", save_every=1), root,
                         NODES, PER_NODE))
    with rank_threads():
        train_sft(config(root, "one", NODES * PER_NODE * ACCUM))
    return root


def test_two_nodes_of_hybrid_shards_train_one_process_s_weights(runs):
    assert max_relative_diff(runs / "one" / "final", runs / "hybrid" / "final") <= 1e-4
    assert_same_curves(runs / "hybrid", runs / "one")
    assert all(len(r["tokens_per_rank"]) == NODES * PER_NODE for r in read_metrics(runs / "hybrid") if r["kind"] == "train")


def test_each_node_shards_and_the_nodes_hold_copies(runs):
    """Every weight and AdamW moment in PER_NODE chunks (not 4: the shard group is one node's ranks),
    each written once, by the node-0 rank that holds it (node 1's ranks hold the same chunks)."""
    tensors = checkpoint_data(checkpoint_dir(runs / "hybrid", 1))["tensors"]
    sharded = {name: sorted(c["file"] for c in entry["chunks"]) for name, entry in tensors.items()
               if name.startswith("models.") or name.endswith(("exp_avg", "exp_avg_sq"))}
    assert len(sharded) == 43 and all(files == ["rank-00000.safetensors", "rank-00001.safetensors"]
                                      for files in sharded.values()), sharded


def test_the_hybrid_checkpoint_resumes_in_one_process(runs):
    copy_checkpoint(runs / "hybrid", 1, runs / "resumed")
    with rank_threads():
        out = train_sft(config(runs, "resumed", NODES * PER_NODE * ACCUM))
    assert [r["resumed_from"] for r in read_metrics(runs / "resumed") if "resumed_from" in r][0].endswith("step-00000001")
    assert max_relative_diff(runs / "one" / "final", out) <= 1e-4


def test_the_export_is_the_bytes_one_process_writes(runs, tmp_path):
    """Reloaded in one process and saved again: the same files, byte for byte; transformers reads
    the tensors the file holds."""
    final = runs / "hybrid" / "final"
    save_model(load_model(final), tmp_path / "again")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (final / name).read_bytes(), name
    hf = AutoModelForCausalLM.from_pretrained(final).state_dict()
    assert all(torch.equal(hf[name], tensor) for name, tensor in load_file(final / "model.safetensors").items())


def test_the_shard_group_is_one_node_unless_set_and_must_divide_the_ranks():
    assert shard_group_size("hybrid", 16, local_world=8) == 8
    assert shard_group_size("hybrid", 16, 4, local_world=8) == 4
    assert (shard_group_size("shard", 16), shard_group_size("replicate", 16)) == (16, 1)
    with pytest.raises(ConfigValueError, match=r"^train.shard_group_size=3 with train.data_parallel=hybrid: "
                                               r"expected a size dividing the 16 ranks"):
        shard_group_size("hybrid", 16, 3)
    with pytest.raises(ConfigValueError, match="LOCAL_WORLD_SIZE=3"):
        shard_group_size("hybrid", 16, local_world=3)
