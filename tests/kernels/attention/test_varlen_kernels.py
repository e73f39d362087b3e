"""torch's varlen_attn adapted across its released signatures (CPU stand-ins: the kernel is CUDA-only)."""
import pytest
import torch

from fusedrl.kernels.attention import varlen as varlen_kernels
from fusedrl.kernels.attention.paths import varlen_kernel
from fusedrl.kernels.attention.varlen import adapt_torch_varlen
from attention_testing import SCALE, random_qkv, reference_attention


def stand_in(record):
    """The attention math behind a varlen_attn, recording the keyword arguments it got and the
    storage of the keys it read."""
    def attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs):
        record.update(kwargs, heads_k=key.shape[1])
        record.setdefault("key_storage", set()).add(key.data_ptr())
        return reference_attention(query, key, value, cu_seq_q.diff().tolist(), cu_seq_k.diff().tolist())
    return attend


def torch_2_10_style(record):
    """A varlen_attn without enable_gqa (torch 2.10 and 2.11): as many K/V heads as query heads."""
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        assert query.shape[1] == key.shape[1] == value.shape[1], "a kernel without enable_gqa"
        record["calls"] = record.get("calls", 0) + 1
        return stand_in(record)(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=is_causal)
    return varlen_attn


def torch_2_13_style(record):
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None):
        return stand_in(record)(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                window_size=window_size, enable_gqa=enable_gqa)
    return varlen_attn


@pytest.mark.parametrize("style,expected", [
    # no enable_gqa: one call per member of the query groups of 3, K/V as they are (never repeated)
    (torch_2_10_style, {"is_causal": True, "heads_k": 2, "calls": 3}),
    (torch_2_13_style, {"window_size": (-1, 0), "scale": SCALE, "enable_gqa": True, "heads_k": 2}),
])
def test_adapted_call_is_causal_with_gqa_values_and_gradients(style, expected):
    seqlens_q, seqlens_k, record = [2, 5], [7, 5], {}
    q, k, v = (x.requires_grad_() for x in random_qkv(sum(seqlens_q), sum(seqlens_k), 6, 2,
                                                      torch.float64))
    cu_q, cu_k = (torch.tensor([0] + lens).cumsum(0).int() for lens in (seqlens_q, seqlens_k))
    out = adapt_torch_varlen(style(record))(q, k, v, cu_q, cu_k, 5, 7, SCALE)
    expected_out = reference_attention(q, k, v, seqlens_q, seqlens_k)
    torch.testing.assert_close(out, expected_out)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    torch.testing.assert_close(grads, torch.autograd.grad(expected_out, (q, k, v), upstream))
    assert record.pop("key_storage") == {k.data_ptr()}  # the caller's keys, not a copy
    assert record == expected


def test_signature_without_causal_is_not_used():
    assert adapt_torch_varlen(lambda query, key, value, cu_seq_q, cu_seq_k, max_q, max_k: None) is None


def test_this_torch_varlen_attn_adapts():
    pytest.importorskip("torch.nn.attention.varlen")
    assert varlen_kernels._torch_varlen_call() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_varlen_kernel_off_cuda(dtype):
    assert varlen_kernel(torch.zeros(1, 1, 8, dtype=dtype)) is None


def top_left_causal(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale):
    """A kernel that aligns the causal mask top-left: wrong for queries after a cached prefix."""
    seqlens_q, seqlens_k = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
    return torch.cat([reference_attention(qi, ki, vi, [len_q], [len_q]) for qi, ki, vi, len_q in zip(
        q.split(seqlens_q), k.split(seqlens_k), v.split(seqlens_k), seqlens_q)]).to(q.dtype)


def raising(*args):
    raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")


def test_checked_call_is_kept_when_it_agrees_with_sdpa():
    call = adapt_torch_varlen(torch_2_13_style({}))
    assert varlen_kernels.checked_varlen_call(call, torch.device("cpu"), torch.float32) is call


@pytest.mark.parametrize("call,problem", [(top_left_causal, "differs"), (raising, "Ampere")])
def test_checked_call_is_dropped_with_a_warning(call, problem):
    with pytest.warns(UserWarning, match=problem):
        assert varlen_kernels.checked_varlen_call(call, torch.device("cpu"), torch.float32) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_cuda_varlen_kernel_serves_packs_and_cached_prefixes(dtype):
    """On a GPU, bf16/fp16 packs take a varlen kernel (no padding, no per-sequence loop) that is
    causal with GQA and aligns queries to the end of their keys (a cached prefix)."""
    seqlens_q, seqlens_k = [1, 7, 33, 5], [1, 12, 33, 64]
    q, k, v = (x.cuda() for x in random_qkv(sum(seqlens_q), sum(seqlens_k), 4, 2, dtype))
    kernel = varlen_kernel(q)
    assert kernel is not None
    cu_q, cu_k = (torch.tensor([0] + lens, device="cuda").cumsum(0).int() for lens in (seqlens_q, seqlens_k))
    out = kernel(q, k, v, cu_q, cu_k, max(seqlens_q), max(seqlens_k), SCALE)
    expected = reference_attention(q.cpu(), k.cpu(), v.cpu(), seqlens_q, seqlens_k)
    # Outputs of magnitude ~1 rounded to the half type, plus its rounded inputs: a few units of 2**-8.
    torch.testing.assert_close(out.double().cpu(), expected, atol=3e-2, rtol=0)
