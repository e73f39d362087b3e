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
        record["calls"] = record.get("calls", 0) + 1
        record.setdefault("key_storage", set()).add(key.data_ptr())
        return reference_attention(query, key, value, cu_seq_q.diff().tolist(),
                                   cu_seq_k.diff().tolist()).to(query.dtype)
    return attend


def torch_2_10_style(record):
    """A varlen_attn without enable_gqa whose wrapper refuses fewer K/V heads than query heads."""
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        if query.shape[1] != key.shape[1]:
            raise ValueError("Expect query and key/value to have the same number of heads")
        return stand_in(record)(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=is_causal)
    return varlen_attn


def torch_2_11_style(record):
    """A varlen_attn without enable_gqa that hands K/V to the flash kernel as they are (which takes
    fewer K/V heads)."""
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
        return stand_in(record)(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                window_size=window_size)
    return varlen_attn


def torch_2_13_style(record):
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None):
        return stand_in(record)(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                window_size=window_size, enable_gqa=enable_gqa)
    return varlen_attn


def grouped_query_case(seqlens_q=(2, 5), seqlens_k=(7, 5)):
    """float64 q [7, 6, D] with grad, k/v [12, 2, D] (groups of 3; the first sequence after a cached
    prefix of 5) and the sizes of a varlen call."""
    q, k, v = (x.requires_grad_() for x in random_qkv(sum(seqlens_q), sum(seqlens_k), 6, 2,
                                                      torch.float64))
    cu_q, cu_k = (torch.tensor([0, *lens]).cumsum(0).int() for lens in (seqlens_q, seqlens_k))
    return (q, k, v), (cu_q, cu_k, max(seqlens_q), max(seqlens_k)), (list(seqlens_q), list(seqlens_k))


@pytest.mark.parametrize("style,gqa,expected", [
    # no enable_gqa, GQA refused: one call per member of the query groups of 3, K/V as they are
    # (never repeated)
    (torch_2_10_style, "grouped", {"is_causal": True, "heads_k": 2, "calls": 3}),
    # no enable_gqa, GQA taken: one call, K/V as they are
    (torch_2_11_style, "as_they_are", {"window_size": (-1, 0), "scale": SCALE, "heads_k": 2, "calls": 1}),
    (torch_2_13_style, "flag", {"window_size": (-1, 0), "scale": SCALE, "enable_gqa": True, "heads_k": 2,
                                "calls": 1}),
])
def test_the_checked_call_is_causal_with_gqa_values_and_gradients(style, gqa, expected):
    record = {}
    call = varlen_kernels.checked_varlen_call(adapt_torch_varlen(style(record)), torch.device("cpu"),
                                              torch.float32)
    assert call.gqa == gqa
    record.clear()
    (q, k, v), sizes, (seqlens_q, seqlens_k) = grouped_query_case()
    out = call(q, k, v, *sizes, SCALE)
    expected_out = reference_attention(q, k, v, seqlens_q, seqlens_k)
    torch.testing.assert_close(out, expected_out)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    torch.testing.assert_close(grads, torch.autograd.grad(expected_out, (q, k, v), upstream))
    assert record.pop("key_storage") == {k.data_ptr()}  # the caller's keys, not a copy
    assert record == expected


def test_without_enable_gqa_kv_as_they_are_come_first():
    assert [call.gqa for call in adapt_torch_varlen(torch_2_10_style({}))] == ["as_they_are", "grouped"]
    assert [call.gqa for call in adapt_torch_varlen(torch_2_13_style({}))] == ["flag"]


def test_signature_without_causal_is_not_used():
    assert adapt_torch_varlen(lambda query, key, value, cu_seq_q, cu_seq_k, max_q, max_k: None) == ()


def test_this_torch_varlen_attn_adapts():
    pytest.importorskip("torch.nn.attention.varlen")
    assert varlen_kernels._torch_varlen_calls()


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


def keys_without_gradient(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale):
    """Right values, but no gradient reaches the keys."""
    return reference_attention(q, k.detach(), v, cu_seqlens_q.diff().tolist(),
                               cu_seqlens_k.diff().tolist()).to(q.dtype)


def test_checked_call_is_kept_when_it_agrees_with_sdpa():
    calls = adapt_torch_varlen(torch_2_13_style({}))
    assert varlen_kernels.checked_varlen_call(calls, torch.device("cpu"), torch.float32) is calls[0]


def test_a_refused_candidate_gives_way_to_the_next_without_a_warning(recwarn):
    calls = adapt_torch_varlen(torch_2_10_style({}))
    assert varlen_kernels.checked_varlen_call(calls, torch.device("cpu"), torch.float32) is calls[1]
    assert not recwarn.list


@pytest.mark.parametrize("call,problem", [(top_left_causal, "output differs"), (raising, "Ampere"),
                                          (keys_without_gradient, "gradients differ")])
def test_checked_call_is_dropped_with_a_warning(call, problem):
    with pytest.warns(UserWarning, match=problem):
        assert varlen_kernels.checked_varlen_call([call], torch.device("cpu"), torch.float32) is None


def test_the_check_runs_inside_inference_mode():
    calls = adapt_torch_varlen(torch_2_11_style({}))
    with torch.inference_mode():
        assert varlen_kernels.checked_varlen_call(calls, torch.device("cpu"), torch.float32) is calls[0]


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
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = kernel(q, k, v, cu_q, cu_k, max(seqlens_q), max(seqlens_k), SCALE)
    reference_inputs = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    expected = reference_attention(*reference_inputs, seqlens_q, seqlens_k)
    # Outputs of magnitude ~1 rounded to the half type, plus its rounded inputs: a few units of 2**-8.
    torch.testing.assert_close(out.double().cpu(), expected, atol=3e-2, rtol=0)
    # Gradients through whichever GQA path this torch's kernel took (kernel.gqa), dk and dv summed
    # over each group of 2.
    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad(out, (q, k, v), upstream.to("cuda", dtype))
    expected_grads = torch.autograd.grad(expected, reference_inputs, upstream)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double().cpu(), want, atol=6e-2, rtol=2e-2)
