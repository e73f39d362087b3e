"""Tensor-parallel generation from the FSDP2 shards (engine/tensor_parallel.py): the rank-interleaved
layout in and out of Hugging Face checkpoints, the sizes that fit, and on 2 gloo ranks the same
greedy tokens, log-probs and logits as one process with no parameter storage moving, speculative
decoding's too (one torchrun launch of tp_worker.py), and `fusedrl generate --tensor-parallel 2
--speculative-tokens 3` printing one process's output."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusedrl.engine.errors import ConfigValueError
from fusedrl.engine.model.hf_io import load_model, save_model
from fusedrl.engine.parallel.tensor_parallel import interleave
from fusedrl.engine.parallel.validate import check_tensor_parallel
from cli_testing import cli_error
from dist_testing import RANK_THREADS, _fusedrl_command, check, run_ranks
from train_testing import demonstrations, write_jsonl

WORKER = Path(__file__).with_name("tp_worker.py")


# One thread per process, the one-process reference too: a CPU matmul rounds by its thread count.
ENV = {**os.environ, "OMP_NUM_THREADS": str(RANK_THREADS), "PYTHONPATH": os.pathsep.join(sys.path)}




def test_interleaved_rows_are_each_rank_s_heads_and_save_as_the_checkpoint(model_dirs, tmp_path):
    path = model_dirs["qwen3"][0]
    model = load_model(path)
    qkv = model.model.layers[0].self_attn.qkv_proj
    whole = qkv.weight.detach().clone()
    q, kv = 4 * 24, 2 * 24  # 4 query heads, 2 key/value heads of 24
    assert qkv.row_blocks() == [("q_proj", 0, 0, q), ("k_proj", q, 0, kv), ("v_proj", q + kv, 0, kv)]
    ptr = qkv.weight.data_ptr()
    interleave(model, 2)
    assert qkv.weight.data_ptr() == ptr  # reordered in place
    assert qkv.row_blocks() == [("q_proj", 0, 0, q // 2), ("k_proj", q // 2, 0, kv // 2), ("v_proj", 72, 0, kv // 2),
                                ("q_proj", 96, q // 2, q // 2), ("k_proj", 144, kv // 2, kv // 2),
                                ("v_proj", 168, kv // 2, kv // 2)]
    # Rank 1's rows (the second half) are its q head pair, its k head and its v head.
    torch.testing.assert_close(qkv.weight[96:144], whole[q // 2:q], rtol=0, atol=0)
    torch.testing.assert_close(qkv.weight[144:168], whole[q + kv // 2:q + kv], rtol=0, atol=0)
    with pytest.raises(ValueError, match="tensor_parallel=2 layout runs only tensor-parallel"):
        qkv.split(torch.zeros(1, qkv.out_features))
    save_model(model, tmp_path / "out")
    saved, original = load_file(tmp_path / "out" / "model.safetensors"), load_file(path / "model.safetensors")
    assert saved.keys() == original.keys()
    for name, tensor in original.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0, msg=name)


def test_a_size_that_does_not_fit_names_those_that_do(model_dirs):
    config = load_model(model_dirs["qwen2"][0]).config  # 2 key/value heads
    with pytest.raises(ConfigValueError, match=r"--tensor-parallel=4: .* 4 ranks .* 2 key/value heads .* these fit: "
                                               r"\[1, 2\]$"):
        check_tensor_parallel(4, 4, config, "--tensor-parallel")
    check_tensor_parallel(2, 4, config)


def test_what_does_not_train_tensor_parallel_is_refused_in_one_line(qwen2_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", demonstrations(4))
    common = [f"model={qwen2_dir}", f"output_dir={tmp_path / 'run'}", f"data.train_file={data}", "train.device=cpu",
              "data.max_length=64", "data.max_prompt_length=32", "data.tokens_per_batch=128", "train.tensor_parallel=2"]
    code, err = cli_error(["sft", *common, "lora.rank=4", "lora.dropout=0.1"], capsys)
    assert (code, err) == (2, "fusedrl sft: train.tensor_parallel=2 with lora.dropout=0.1: not supported "
                              "(each tensor rank would draw its own dropout mask on the same input); set one "
                              "of them off\n")
    code, err = cli_error(["sft", *common], capsys)  # one process: no tensor ranks
    assert code == 2 and err.startswith("fusedrl sft: train.tensor_parallel=2: expected a size dividing the 1 ranks")
    assert err.count("\n") == 1


def test_two_tensor_ranks_generate_one_process_s_tokens_from_their_shards(model_dirs):
    """Qwen2 (tied embedding, q/k/v biases) and Qwen3 (q/k norms, untied head), checked in the worker."""
    result = run_ranks(WORKER, "cpu", model_dirs["qwen2"][0], model_dirs["qwen3"][0])
    check(result)
    assert result.stdout.count("ok ") == 2, result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallelism needs 2 GPUs")
def test_two_gpus_replay_the_tensor_parallel_decode_graphs_across_rollouts(model_dirs):
    """The decode steps captured as CUDA graphs with NCCL all-reduces inside, replayed over two
    rollouts with the parameters' storage unchanged (not yet run: no machine with 2 GPUs so far)."""
    result = run_ranks(WORKER, "cuda", model_dirs["qwen2"][0])
    check(result)
    assert result.stdout.count("ok ") == 1, result.stdout


def test_generate_command_at_tensor_parallel_2_prints_one_process_s_tokens(model_dirs):
    path = model_dirs["llama"][0]  # untied head, llama3 RoPE scaling
    args = ["generate", "--model", path, "--prompt", "hello world", "--prompt", "the lazy dog", "--prompt", "fox",
            "--temperature", "0", "--max-new-tokens", "6", "--json", "--no-progress",
            "--device", "cpu"]  # two ranks: a one-GPU machine has too few GPUs for them
    # speculative decoding on the tensor ranks: the same greedy tokens
    result = run_ranks(_fusedrl_command(), *args, "--tensor-parallel", "2", "--speculative-tokens", "3")
    check(result)
    one = subprocess.run([_fusedrl_command(), *map(str, args)], capture_output=True, text=True, timeout=120, env=ENV)
    tokens = [[json.loads(line)["token_ids"] for line in out.splitlines()] for out in (result.stdout, one.stdout)]
    assert len(tokens[0]) == 3 and tokens[0] == tokens[1]
