"""GPU-only paths of generation, checked where a GPU runs the suite: decode steps replayed from CUDA
graphs give what eager steps give, in bf16 and fp32."""
import pytest
import torch

from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.sampling_params import SamplingParams
from engine_testing import random_prompts
from moe_testing import save_moe_base

pytestmark = pytest.mark.gpu


def _pair(path, dtype):
    graphed = LLM(path, dtype=dtype, kv_cache_memory=1 << 26)
    eager = LLM(path, dtype=dtype, kv_cache_memory=1 << 26, use_cuda_graphs=False)
    assert graphed.runner.graphs is not None and graphed.runner.graphs.graphs and eager.runner.graphs is None
    return graphed, eager


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_cuda_graph_decode_is_the_eager_decode_bit_for_bit(model_dirs, arch, dtype):
    """8 rows decode as the graph of 8 and as 8 eager rows: the same kernels on the same shapes, so
    the same bits (ignore_eos keeps the batch at 8 for every step)."""
    graphed, eager = _pair(model_dirs[arch][0], dtype)
    prompts = random_prompts([5, 11, 3, 9, 7, 4, 6, 8], seed=3)
    for params in (SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True),
                   SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=12, seed=4, ignore_eos=True)):
        for x, y in zip(graphed.generate(prompts, params), eager.generate(prompts, params)):
            assert x.outputs[0].token_ids == y.outputs[0].token_ids
            assert x.outputs[0].logprobs == y.outputs[0].logprobs


def test_padded_graph_rows_change_nothing(model_dirs):
    """5 rows replay the graph of 8 (3 padding rows write no cache slot and read no key): fp32 greedy
    tokens as eager, log-probs within fp32 GEMM reordering (cuBLAS may tile 5 and 8 rows differently)."""
    graphed, eager = _pair(model_dirs["qwen2"][0], "float32")
    prompts = random_prompts([5, 11, 3, 9, 7], seed=3)
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    for x, y in zip(graphed.generate(prompts, params), eager.generate(prompts, params)):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor(x.outputs[0].logprobs), torch.tensor(y.outputs[0].logprobs),
                                   atol=1e-5, rtol=0)


def test_decode_past_16_rows_runs_cublas_in_the_graph_as_eagerly(model_dirs):
    """32 rows (past primitives.FUSED_NORM_LINEAR_ROWS: the norm kernel, cuBLAS's GEMM and SiLU *
    up apart) decode as the graph of 32 and as 32 eager rows in bf16: the same bits."""
    graphed, eager = _pair(model_dirs["qwen2"][0], "bfloat16")
    prompts = random_prompts([3 + i % 9 for i in range(32)], seed=7)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=12, seed=4, ignore_eos=True)
    for x, y in zip(graphed.generate(prompts, params), eager.generate(prompts, params)):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].logprobs == y.outputs[0].logprobs


def test_moe_cuda_graph_decode_in_bf16_is_the_eager_decode_bit_for_bit(tmp_path):
    """A bf16 MoE model (the expert GEMMs: torch's grouped_mm on sm_90/sm_100, ours elsewhere)
    decodes inside the captured graph as eagerly: no host read of the group offsets in the capture,
    the same bits."""
    graphed, eager = _pair(save_moe_base(tmp_path / "moe"), "bfloat16")
    prompts = random_prompts([5, 11, 3, 9, 7, 4, 6, 8], seed=5)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=12, seed=6, ignore_eos=True)
    for x, y in zip(graphed.generate(prompts, params), eager.generate(prompts, params)):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].logprobs == y.outputs[0].logprobs


def test_decode_steps_launched_ahead_draw_what_a_step_at_a_time_draws(model_dirs):
    """On the graph path (a GPU's default: steps launched ahead, their tokens read through pinned
    buffers and events) 8 fp32 rows ending at different steps give the tokens of the same engine
    reading each step before launching the next, and log-probs within fp32 GEMM reordering (a
    step launched ahead keeps the rows the step before ended)."""
    path = model_dirs["qwen2"][0]
    ahead = LLM(path, dtype="float32", kv_cache_memory=1 << 26)
    assert ahead.overlap and ahead.runner.graphs is not None
    launch, launched = ahead.runner.launch, []
    ahead.runner.launch = lambda seqs, is_prefill, **kw: (
        launched.append(kw.get("previous") is not None) or launch(seqs, is_prefill, **kw))
    plain = LLM(path, dtype="float32", kv_cache_memory=1 << 26, overlap_decode=False)
    prompts = random_prompts([5, 11, 3, 9, 7, 4, 6, 8], seed=3)
    params = [SamplingParams(temperature=t, max_new_tokens=n, seed=i, ignore_eos=True)
              for i, (t, n) in enumerate(zip([0, 0.8] * 4, [12, 3, 7, 12, 5, 9, 12, 2]))]
    for x, y in zip(ahead.generate(prompts, params), plain.generate(prompts, params)):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor(x.outputs[0].logprobs),
                                   torch.tensor(y.outputs[0].logprobs), atol=1e-5, rtol=0)
    assert sum(launched) > 5 and not ahead.reads_ahead
    assert ahead.block_manager.num_free_blocks == ahead.block_manager.num_blocks
