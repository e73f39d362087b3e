"""The padded SDPA path against a per-sequence reference: packed training attention (outputs and
gradients) and prefill over cached prefixes read from shuffled pages."""
import pytest
import torch

from fusedrl.kernels.attention.padded import packed_causal_attention, paged_prefill_attention, plan_groups
from attention_testing import SCALE, paged, random_qkv, reference_attention

# float64 is the exact check (same math, different padding); fp32 and bf16 bound what the padded
# batch's different SDPA blocking costs at those precisions.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}

# Odd lengths, single tokens, one group and several (lengths on both sides of powers of two).
PACKS = [[5, 1, 9, 3], [7], [4, 4, 4], [1, 1, 1], [1, 300, 17, 64, 65, 2, 128, 129]]


@pytest.mark.parametrize("dtype", TOLERANCES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])
@pytest.mark.parametrize("lens", PACKS)
def test_packed_matches_per_sequence_reference(lens, heads, kv_heads, dtype):
    n, tol = sum(lens), TOLERANCES[dtype]
    q, k, v = (x.requires_grad_() for x in random_qkv(n, n, heads, kv_heads, dtype))
    out = packed_causal_attention(q, k, v, plan_groups(lens, lens, "cpu"), SCALE)
    assert out.shape == q.shape and out.dtype == dtype
    ref_q, ref_k, ref_v = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected = reference_attention(ref_q, ref_k, ref_v, lens, lens)
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    weight = torch.randn_like(expected)  # a generic upstream gradient
    grads = torch.autograd.grad((out.double() * weight).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weight).sum(), (ref_q, ref_k, ref_v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, atol=4 * tol, rtol=4 * tol)


def test_packed_keys_longer_than_queries():
    """Queries that are the last Lq of Lk packed keys (how the varlen kernels' check uses it)."""
    seqlens_q, seqlens_k = [2, 5, 1], [6, 5, 33]
    q, k, v = random_qkv(sum(seqlens_q), sum(seqlens_k), 4, 2, torch.float64)
    out = packed_causal_attention(q, k, v, plan_groups(seqlens_q, seqlens_k, "cpu"), SCALE)
    torch.testing.assert_close(out, reference_attention(q, k, v, seqlens_q, seqlens_k))


def test_packed_sequences_do_not_see_each_other():
    lens = [6, 40, 3]
    q, k, v = random_qkv(sum(lens), sum(lens), 4, 2, torch.float64)
    plan = plan_groups(lens, lens, "cpu")
    out = packed_causal_attention(q, k, v, plan, SCALE)
    k[:6] += 10.0
    again = packed_causal_attention(q, k, v, plan, SCALE)
    torch.testing.assert_close(again[6:], out[6:], atol=0, rtol=0)


@pytest.mark.parametrize("prefix", [0, 7])
def test_a_sequence_rounds_the_same_in_any_batch(prefix):
    """fp32: a sequence's outputs and gradients are bitwise the same alone, beside a longer
    sequence of its power-of-two group, or beside others (the padded width is its own group's
    power of two, not the batch's longest): a training forward equals the scoring forward over
    another batch of the same rows. prefix: keys before each query (a shared prompt)."""
    lens = [9, 13, 5, 16, 11]
    seqlens_k = [n + prefix for n in lens]
    q, k, v = random_qkv(sum(lens), sum(seqlens_k), 4, 2, torch.float32, seed=3)

    def rows_of(i, lengths, starts):
        return range(starts[i], starts[i] + lengths[i])

    def run(picked):
        q_starts = [sum(lens[:i]) for i in range(len(lens))]
        k_starts = [sum(seqlens_k[:i]) for i in range(len(lens))]
        pq, pk, pv = (x[[r for i in picked for r in rows_of(i, lens_, starts)]].detach()
                      .requires_grad_()
                      for x, lens_, starts in ((q, lens, q_starts), (k, seqlens_k, k_starts),
                                               (v, seqlens_k, k_starts)))
        plan = plan_groups([lens[i] for i in picked], [seqlens_k[i] for i in picked], "cpu")
        out = packed_causal_attention(pq, pk, pv, plan, SCALE)
        out.backward(torch.ones_like(out))
        first_q, first_k = lens[picked[0]], seqlens_k[picked[0]]
        return out[:first_q], pq.grad[:first_q], pk.grad[:first_k], pv.grad[:first_k]

    alone = run([0])
    for batch in ([0, 1], [0, 1, 2, 3, 4], [0, 2, 4]):
        for a, b in zip(alone, run(batch)):
            assert torch.equal(a, b), batch


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prefill_reads_cached_prefixes_from_shuffled_pages(dtype):
    """Sequences with no prefix, a one-token query over a long prefix, and cut mid-block."""
    seqlens_k, seqlens_q = [9, 30, 5, 17, 1], [9, 1, 2, 13, 1]
    q, k, v = random_qkv(sum(seqlens_q), sum(seqlens_k), 4, 2, dtype, seed=1)
    k_cache, v_cache, block_tables = paged(k, v, seqlens_k, block_size=4)
    plan = plan_groups(seqlens_q, seqlens_k, "cpu")
    out = paged_prefill_attention(q, k_cache, v_cache, block_tables, plan, SCALE)
    expected = reference_attention(q, k, v, seqlens_q, seqlens_k)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCES[dtype], rtol=TOLERANCES[dtype])


def test_groups_follow_powers_of_two_not_sequences():
    assert len(plan_groups([3] * 100 + [5] * 100, [3] * 100 + [5] * 100, "cpu").groups) == 2
    assert len(plan_groups([1, 2, 3, 4], [40, 50, 60, 64], "cpu").groups) == 3  # Lq 1, 2, 3-4 x Lk 33-64


@pytest.mark.parametrize("seqlens_q,seqlens_k", [([], []), ([0, 2], [0, 2]), ([3], [2]), ([1, 2], [3])])
def test_bad_lengths_are_one_line_errors(seqlens_q, seqlens_k):
    with pytest.raises(ValueError, match="seqlens_q <= seqlens_k"):
        plan_groups(seqlens_q, seqlens_k, "cpu")
