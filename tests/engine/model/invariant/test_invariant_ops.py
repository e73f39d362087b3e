"""The batch-invariant mode's primitives: close to the ordinary ops, and each row's result the same
bits whatever else is in the tensor (alone, in a batch, another pack layout, 1 or 2 threads)."""
import pytest
import torch
import torch.nn.functional as F

from fusedrl.engine.model.invariant import BatchInvariant
from fusedrl.kernels import reference
from fusedrl.kernels.invariant import fixed_order as ops
from fusedrl.kernels.invariant.chunked_attention import chunked_attention
from invariant_testing import one_thread  # noqa: F401 (autouse fixture)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("width", [1, 5, 64, 300])
def test_tree_reductions_are_close_to_torch_and_independent_of_other_rows(width):
    x = randn(37, width)
    torch.testing.assert_close(ops.tree_sum(x), x.sum(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(ops.tree_max(x), x.amax(-1))
    assert torch.equal(ops.tree_sum(x)[5:6], ops.tree_sum(x[5:6]))
    assert torch.equal(ops.tree_sum(x.t(), 0)[5:6], ops.tree_sum(x[5:6].t(), 0))


def test_transcendental_ops_depend_on_the_value_only():
    """Past torch's parallel grain, at odd sizes, with 2 threads: every element (the tail ones too) is
    what it is alone."""
    x = randn(100_003)
    picks = torch.tensor([0, 1, 17, 50_000, 99_990, 100_001, 100_002])
    torch.set_num_threads(2)
    for fn, ref in ((ops.exp, torch.exp), (ops.log, torch.log)):
        values = x.abs() + 0.1 if fn is ops.log else x
        whole = fn(values)
        torch.testing.assert_close(whole, ref(values))
        assert torch.equal(whole[picks], torch.stack([fn(values[i:i + 1])[0] for i in picks]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rows_do_not_depend_on_the_batch_or_threads(dtype):
    x, w, b = randn(41, 96).to(dtype), randn(300, 96, seed=1).to(dtype), randn(300, seed=2).to(dtype)
    out = ops.linear(x, w, b)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), F.linear(x.float(), w.float(), b.float()).to(dtype).float(),
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-4)
    assert torch.equal(ops.linear(x[7:8], w, b), out[7:8])
    assert torch.equal(ops.linear(x.flip(0), w, b).flip(0), out)
    torch.set_num_threads(2)
    assert torch.equal(ops.linear(x, w, b), out)


def test_linear_pieces_change_nothing(monkeypatch):
    x, w = randn(23, 64), randn(50, 64, seed=1)
    whole = ops.linear(x, w)
    monkeypatch.setattr(ops, "PRODUCT_ELEMENTS", 64 * 7)  # 7 columns, 1 row per piece
    assert torch.equal(ops.linear(x, w), whole)


def test_norm_silu_and_logprobs_are_close_to_torch():
    x, weight = randn(9, 64), randn(64, seed=1)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
    torch.testing.assert_close(ops.silu(x), F.silu(x))
    logits, tokens, temps = randn(9, 300) * 4, torch.arange(9) * 30, torch.linspace(0.5, 1.5, 9)
    logp, entropy = ops.token_logprobs(logits, tokens, temps, with_entropy=True)
    ref = torch.log_softmax(logits / temps[:, None], -1)
    torch.testing.assert_close(logp, ref[torch.arange(9), tokens])
    torch.testing.assert_close(entropy, -(ref.exp() * ref).sum(-1))


def sdpa_packed(q, k, v, seqlens):
    """Reference: causal SDPA of each sequence on its own."""
    outs = [F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1),
                                           is_causal=True, enable_gqa=True).transpose(0, 1)
            for qi, ki, vi in zip(q.split(seqlens), k.split(seqlens), v.split(seqlens))]
    return torch.cat(outs)


def packed_attention(q, k, v, seqlens, chunk):
    """chunked_attention over a pack: the page table holds each sequence's start + j * chunk."""
    lens = torch.tensor(seqlens)
    starts = lens.cumsum(0) - lens
    seq_index = torch.repeat_interleave(torch.arange(len(seqlens)), lens)
    positions = torch.arange(q.shape[0]) - starts[seq_index]
    table = (starts[:, None] + torch.arange(-(-max(seqlens) // chunk)) * chunk).int()
    return chunked_attention(q, k, v, positions, seq_index, table, chunk)


def test_chunked_attention_matches_sdpa_and_ignores_the_pack():
    seqlens = [5, 11, 1, 8]
    n = sum(seqlens)
    q, k, v = randn(n, 4, 16), randn(n, 2, 16, seed=1), randn(n, 2, 16, seed=2)
    out = packed_attention(q, k, v, seqlens, chunk=4)
    torch.testing.assert_close(out, sdpa_packed(q, k, v, seqlens))
    # Sequence 1 alone gives the same bits as inside the pack.
    alone = packed_attention(q[5:16], k[5:16], v[5:16], [11], chunk=4)
    assert torch.equal(alone, out[5:16])


def test_paged_chunks_give_the_packed_bits_even_with_garbage_past_the_context():
    """Decode of the last token of a sequence over pages == its row of the packed training forward."""
    chunk, length = 4, 11
    q, k, v = randn(length, 4, 16), randn(length, 2, 16, seed=1), randn(length, 2, 16, seed=2)
    packed = packed_attention(q, k, v, [length], chunk)
    k_cache = torch.full((6, chunk, 2, 16), float("nan"))  # unwritten slots: NaN must never leak in
    v_cache = torch.full((6, chunk, 2, 16), float("nan"))
    table = torch.tensor([[4, 1, 3, -1]], dtype=torch.int32)  # pages 0-2, one unused entry
    for pos in range(length):
        block, offset = table[0, pos // chunk], pos % chunk
        k_cache[block, offset], v_cache[block, offset] = k[pos], v[pos]
    decoded = chunked_attention(q[-1:], k_cache.flatten(0, 1), v_cache.flatten(0, 1), torch.tensor([length - 1]),
                                torch.tensor([0]), table.clamp(min=0) * chunk, chunk)
    assert torch.equal(decoded, packed[-1:])


def test_mode_arguments_are_checked():
    with pytest.raises(ValueError, match=r"BatchInvariant.chunk_size=0 is invalid: expected an int >= 1"):
        BatchInvariant(0)
    with pytest.raises(ValueError, match=r"seqlens=\[2, 2\] must be positive and sum to 3"):
        BatchInvariant(4).packed_hidden(None, torch.zeros(3, dtype=torch.long), [2, 2])
    cache = torch.empty(2, 8, 1, 16)  # block size 8
    with pytest.raises(ValueError, match="KV block size 8 != BatchInvariant.chunk_size 4"):
        BatchInvariant(4).paged_hidden(None, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                                       None, [(cache, cache)])
    for segment in (8, 48, "64"):
        with pytest.raises(ValueError, match=f"BatchInvariant.segment={segment!r} is invalid: expected a power of two"):
            BatchInvariant(4, segment)
