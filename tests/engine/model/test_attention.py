"""Packed (varlen) training attention: the one-call block-diagonal path equals the per-sequence loop."""
import pytest
import torch

from fusedrl.engine.model import attention as attention
from fusedrl.engine.model.attention import AttentionMetadata, varlen_attention


@pytest.mark.parametrize("lens", [[5, 1, 9, 3], [7], [4, 4, 4]])
def test_dense_pack_matches_per_sequence_loop(lens, monkeypatch):
    n = sum(lens)
    q = torch.randn(n, 4, 8, requires_grad=True)
    k, v = torch.randn(n, 2, 8, requires_grad=True), torch.randn(n, 2, 8, requires_grad=True)
    meta = AttentionMetadata.packed(lens, "cpu")
    dense = varlen_attention(q, k, v, meta)
    dense_grads = torch.autograd.grad((dense * dense).sum(), (q, k, v))
    monkeypatch.setattr(attention, "DENSE_PACK_TOKENS", 0)
    looped = varlen_attention(q, k, v, meta)
    looped_grads = torch.autograd.grad((looped * looped).sum(), (q, k, v))
    torch.testing.assert_close(dense, looped)
    for a, b in zip(dense_grads, looped_grads):
        torch.testing.assert_close(a, b)
    # No attention across sequences: changing sequence 0 leaves the others' outputs alone.
    if len(lens) > 1:
        k2 = k.detach().clone()
        k2[: lens[0]] += 10.0
        again = varlen_attention(q, k2, v, meta)
        torch.testing.assert_close(again[lens[0]:], dense[lens[0]:])
