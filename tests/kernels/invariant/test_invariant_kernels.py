"""The batch-invariant mode's GPU kernels (segment attention through a page table, the per-row
log-softmax) under the Triton interpreter: close to the float64 reference on odd shapes, and each
query's or row's result the same bits however it is batched: alone or in a batch, decoded over
scattered pages full of NaN garbage or read from a training pack, its segments spread over 1 or 3
programs."""
import pytest
import torch
import torch.nn.functional as F

from fusedrl.kernels.invariant.segment_attention import segment_attention
from fusedrl.kernels.invariant.row_logprobs import row_logprobs
from invariant_testing import randn
from kernel_testing import DEVICE, needs_triton

pytestmark = needs_triton


def pack(seqlens, page):
    """(positions, seq_index, page_table) of a pack of sequences of these lengths."""
    lens = torch.tensor(seqlens, device=DEVICE)
    starts = lens.cumsum(0) - lens
    seq_index = torch.repeat_interleave(torch.arange(len(seqlens), device=DEVICE), lens)
    positions = torch.arange(int(lens.sum()), device=DEVICE) - starts[seq_index]
    table = (starts[:, None] + torch.arange(-(-max(seqlens) // page), device=DEVICE) * page).int()
    return positions, seq_index, table


def reference(q, k, v, seqlens):
    """float64 causal SDPA of each sequence on its own."""
    outs = [F.scaled_dot_product_attention(*(x.double().transpose(0, 1) for x in (qi, ki, vi)), is_causal=True,
                                           enable_gqa=True).transpose(0, 1)
            for qi, ki, vi in zip(q.split(seqlens), k.split(seqlens), v.split(seqlens))]
    return torch.cat(outs)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(6, 2, 24), (4, 4, 16)])
def test_close_to_float64_across_segments(dtype, tol, heads, kv_heads, dim):
    seqlens = [1, 37, 5, 18]  # a T=1 sequence; 37 keys span 3 segments of 16
    n = sum(seqlens)
    q, k, v = randn(n, heads, dim, dtype=dtype), randn(n, kv_heads, dim, dtype=dtype, seed=1), \
        randn(n, kv_heads, dim, dtype=dtype, seed=2)
    positions, seq_index, table = pack(seqlens, page=4)
    out = segment_attention(q, k, v, positions, seq_index, table, 4, 16, max(seqlens) - 1)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, k, v, seqlens), rtol=tol, atol=tol)


def test_a_query_is_the_same_bits_decoded_over_pages_as_in_a_pack():
    """Each position of a 45-token sequence, decoded alone over scattered pages (NaN in every slot it
    must not read) and in a batch of 3 decodes, equals its row of the packed forward; spreading the
    segments over 3 programs changes nothing."""
    page, length, heads, dim = 4, 45, 6, 24
    q, k, v = randn(length, heads, dim, dtype=torch.bfloat16), randn(length, 2, dim, dtype=torch.bfloat16, seed=1), \
        randn(length, 2, dim, dtype=torch.bfloat16, seed=2)
    positions, seq_index, table = pack([length], page)
    packed = segment_attention(q, k, v, positions, seq_index, table, page, 16, length - 1)
    assert torch.equal(segment_attention(q, k, v, positions, seq_index, table, page, 16, length - 1,
                                         segment_programs=3), packed)
    blocks = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:-(-length // page)].to(DEVICE)
    k_cache = torch.full((40, page, 2, dim), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    for pos in range(length):
        k_cache[blocks[pos // page], pos % page], v_cache[blocks[pos // page], pos % page] = k[pos], v[pos]
    page_table = (blocks * page).int()[None].expand(3, -1).contiguous()  # 3 sequences sharing the pages
    for pos in (0, 3, 4, 16, 31, 32, length - 1):
        one = torch.tensor([pos], device=DEVICE)
        alone = segment_attention(q[pos:pos + 1], k_cache.flatten(0, 1), v_cache.flatten(0, 1), one,
                                  torch.zeros_like(one), page_table, page, 16, length + 7)
        assert torch.equal(alone, packed[pos:pos + 1]), pos
        batch = torch.tensor([2, pos, 40], device=DEVICE)
        among = segment_attention(q[batch], k_cache.flatten(0, 1), v_cache.flatten(0, 1), batch,
                                  torch.arange(3, device=DEVICE), page_table, page, 16, length - 1)
        assert torch.equal(among[1], packed[pos]), pos


def test_empty_batch_and_bad_arguments():
    q, k = randn(0, 4, 16), randn(8, 2, 16)
    positions, seq_index = torch.zeros(0, dtype=torch.long, device=DEVICE), torch.zeros(0, dtype=torch.long, device=DEVICE)
    table = torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)
    assert segment_attention(q, k, k, positions, seq_index, table, 4, 16, 7).shape == (0, 4, 16)
    one = torch.zeros(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="segment=24 must be a power of two >= 16"):
        segment_attention(randn(1, 4, 16), k, k, one, one, table, 4, 24, 7)
    with pytest.raises(ValueError, match="page_table must be int32"):
        segment_attention(randn(1, 4, 16), k, k, one, one, table.long(), 4, 16, 7)
    with pytest.raises(ValueError, match="positions and seq_index must be int64"):
        segment_attention(randn(1, 4, 16), k, k, one.int(), one, table, 4, 16, 7)
    with pytest.raises(ValueError, match=r"k_rows \(8, 2, 16\) / v_rows \(8, 2, 16\) do not fit q \(1, 3, 16\)"):
        segment_attention(randn(1, 3, 16), k, k, one, one, table, 4, 16, 7)


def test_row_logprobs_close_to_float64_and_the_same_bits_in_any_batch():
    vocab = 5003  # two blocks of 4096, the second partial
    logits = randn(9, vocab) * 4
    logits[2, :4000] = float("-inf")  # a whole block at -inf, then finite logits
    logits[5, 17] = float("-inf")
    tokens = torch.randint(0, vocab, (9,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    tokens[2] = 4500
    temps = torch.linspace(0.5, 1.5, 9, device=DEVICE)
    logp, entropy = row_logprobs(logits, tokens, temps)
    ref = torch.log_softmax(logits.double() / temps[:, None].double(), -1)
    torch.testing.assert_close(logp.double(), ref.gather(1, tokens[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
    plogp = torch.where(ref.isinf(), 0.0, ref.exp() * ref)
    torch.testing.assert_close(entropy.double(), -plogp.sum(-1), rtol=1e-5, atol=1e-5)
    for i in (0, 2, 8):
        alone = row_logprobs(logits[i:i + 1], tokens[i:i + 1], temps[i:i + 1])
        assert torch.equal(alone[0], logp[i:i + 1]) and torch.equal(alone[1], entropy[i:i + 1])
    outside = row_logprobs(logits[:2], torch.tensor([-1, vocab], device=DEVICE), temps[:2])[0]
    assert outside.isnan().all()
    empty = row_logprobs(logits[:0], tokens[:0], temps[:0])
    assert empty[0].shape == empty[1].shape == (0,)
    with pytest.raises(ValueError, match="logits must be fp32"):
        row_logprobs(logits.bfloat16(), tokens, temps)
    with pytest.raises(ValueError, match="temperatures \\(fp32\\) must be \\[9\\]"):
        row_logprobs(logits, tokens, temps[:3])
