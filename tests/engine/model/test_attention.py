"""The attention chooser: packed and prefill attention on each path against a per-sequence reference,
the varlen-kernel plumbing (exercised on the CPU with a stand-in kernel), and attention calls per
layer that do not grow with the number of sequences."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.kernels.attention import AttentionMetadata, paths, prefill_attention, varlen_attention
from fusedrl.engine.model.causal_lm import CausalLM
from fusedrl.engine.model.config import ModelConfig
from attention_testing import paged, random_qkv, reference_attention
from engine_testing import make_hf_model, random_prompts


def prefill_meta(seqlens_q, seqlens_k, block_tables):
    cu = [torch.tensor([0] + lens).cumsum(0).int() for lens in (seqlens_q, seqlens_k)]
    return AttentionMetadata(seqlens_q=seqlens_q, seqlens_k=seqlens_k, cu_seqlens_q=cu[0],
                             cu_seqlens_k=cu[1], block_tables=block_tables)


def stand_in_kernel(calls):
    """A CPU stand-in for the CUDA varlen kernels, with their call signature; records its calls."""
    def kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale):
        seqlens_q, seqlens_k = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
        assert (max_q, max_k) == (max(seqlens_q), max(seqlens_k)) and scale == q.shape[-1] ** -0.5
        calls.append((q.shape[0], k.shape[0]))
        return reference_attention(q, k, v, seqlens_q, seqlens_k)
    return kernel


@pytest.mark.parametrize("lens", [[5, 1, 9, 3], [4, 4, 4], [1]])
def test_varlen_attention_matches_reference_with_gradients(lens):
    q, k, v = (x.requires_grad_() for x in random_qkv(sum(lens), sum(lens), 4, 2, torch.float64))
    out = varlen_attention(q, k, v, AttentionMetadata.packed(lens, "cpu"))
    expected = reference_attention(q, k, v, lens, lens)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("use_kernel", [False, True], ids=["padded-sdpa", "varlen-kernel"])
def test_prefill_attention_over_cached_prefixes(use_kernel, monkeypatch):
    """The varlen-kernel path gathers every sequence's keys from the pages with one index."""
    seqlens_q, seqlens_k = [1, 6, 3, 12], [9, 6, 11, 12]
    q, k, v = random_qkv(sum(seqlens_q), sum(seqlens_k), 4, 2, torch.float64)
    k_cache, v_cache, block_tables = paged(k, v, seqlens_k, block_size=4)
    calls = []
    if use_kernel:
        monkeypatch.setattr(paths, "varlen_kernel", lambda x: stand_in_kernel(calls))
    meta = prefill_meta(seqlens_q, seqlens_k, block_tables)
    out = prefill_attention(q, None, None, k_cache, v_cache, meta)
    torch.testing.assert_close(out, reference_attention(q, k, v, seqlens_q, seqlens_k))
    assert calls == ([(sum(seqlens_q), sum(seqlens_k))] if use_kernel else [])


def test_varlen_attention_hands_the_pack_to_the_kernel(monkeypatch):
    lens, calls = [3, 8, 1], []
    monkeypatch.setattr(paths, "varlen_kernel", lambda x: stand_in_kernel(calls))
    q, k, v = random_qkv(sum(lens), sum(lens), 4, 2, torch.float64)
    out = varlen_attention(q, k, v, AttentionMetadata.packed(lens, "cpu"))
    torch.testing.assert_close(out, reference_attention(q, k, v, lens, lens))
    assert calls == [(12, 12)]


class AttentionCalls(TorchDispatchMode):
    """Counts the attention kernels dispatched (forward and backward SDPA ops)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += "scaled_dot_product" in func.name()
        return func(*args, **(kwargs or {}))


def training_calls_per_layer(lens: list[int]) -> int:
    """Attention ops per layer in a training forward + backward of one packed batch."""
    hf = make_hf_model("qwen2", num_hidden_layers=1, max_position_embeddings=1024)
    model = CausalLM(ModelConfig.from_hf(hf.config))
    ids = torch.randint(10, 300, (sum(lens),))
    with AttentionCalls() as calls:
        model.forward_packed(ids, lens).square().mean().backward()
    return calls.count


def test_training_attention_calls_do_not_grow_with_sequences():
    """A 16k-token pack of 128 sequences against 64 sequences of the same tokens: the same count
    (two length groups each, one forward and one backward op per group)."""
    many = training_calls_per_layer([96, 160] * 64)
    few = training_calls_per_layer([192, 320] * 32)
    assert many == few == 4


def prefill_calls_per_layer(qwen2_dir, num_prompts: int) -> int:
    llm = LLM(qwen2_dir, dtype="float32", block_size=4)
    prompts = random_prompts([17, 23, 29, 31] * (num_prompts // 4), seed=4)
    with AttentionCalls() as calls:
        llm.generate(prompts, SamplingParams(n=4, max_new_tokens=1, seed=0))
    return calls.count / llm.config.num_layers


def test_prefill_attention_calls_do_not_grow_with_sequences(qwen2_dir):
    """32 prompts x 4 samples against 8 x 4: each prompt is prefilled once (its samples share its
    full blocks) and the calls per layer are the length groups, not the sequences."""
    assert prefill_calls_per_layer(qwen2_dir, 32) == prefill_calls_per_layer(qwen2_dir, 8) <= 3
