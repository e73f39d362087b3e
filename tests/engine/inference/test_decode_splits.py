"""A decode step's attention splits come from one rule whether the step replays a CUDA graph (block
tables at full width) or runs eagerly (tables as wide as the batch's longest): the same rows split
alike, so the two paths run the same launches and give the same bits. Checked on the CPU with an
H100's SM count standing in for the device's. And the capture mode of a decode graph with a process
group up (NCCL's watchdog thread queries events while we capture)."""
import pytest
import torch
import torch.distributed as dist

from fusedrl import kernels
from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.decode_graphs import DecodeGraphs, capture_error_mode
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.kernels.attention import paged
from engine_testing import random_prompts

H100_SMS = 132


def _decode_launches(llm, monkeypatch, prompts):
    """(table width, splits) of every decode launch of a greedy generate over `prompts`."""
    launches = []
    decode = kernels.rope_store_decode

    def spy(*args):
        launches.append((args[9].shape[1], args[12]))  # block_tables, num_splits
        return decode(*args)
    monkeypatch.setattr(kernels, "rope_store_decode", spy)
    llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
    monkeypatch.setattr(kernels, "rope_store_decode", decode)
    return launches


def test_graph_and_eager_decode_choose_the_same_splits_for_the_same_rows(qwen2_dir, monkeypatch):
    monkeypatch.setattr(paged, "sm_count", lambda device: H100_SMS)
    prompts = random_prompts([5, 11, 3, 9, 7, 4, 6, 8], seed=3)
    graphed = LLM(qwen2_dir, max_num_seqs=8)
    graphed.runner.graphs = DecodeGraphs(graphed.runner, max_num_seqs=8, capture=False)
    eager = LLM(qwen2_dir, max_num_seqs=8, use_cuda_graphs=False)  # a GPU captures by default
    assert eager.runner.graphs is None
    from_graphs = _decode_launches(graphed, monkeypatch, prompts)
    from_eager = _decode_launches(eager, monkeypatch, prompts)
    assert from_graphs and len(from_graphs) == len(from_eager)
    # The tables differ in width (the eager steps' as wide as 2 pages of context), the splits not:
    # batch 8 x 2 KV heads over 128 tokens of capacity is 2 splits, where the eager tables' width
    # alone would give 1.
    assert {w for w, _ in from_graphs} == {graphed.runner.max_blocks_per_seq}
    assert max(w for w, _ in from_eager) < graphed.runner.max_blocks_per_seq
    assert [s for _, s in from_graphs] == [s for _, s in from_eager] == [2] * len(from_graphs)


def test_splits_off_cuda_are_one():
    assert paged.launch_splits(8, 2, 64, 16, torch.device("cpu")) == 1


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_decode_graphs_capture_thread_local_while_a_process_group_is_up(one_rank_group):
    assert capture_error_mode() == "thread_local"


def test_decode_graphs_capture_in_global_mode_alone():
    assert not dist.is_initialized()
    assert capture_error_mode() == "global"
