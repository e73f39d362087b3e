"""Attention test helpers: a per-sequence float64 reference and random packed Q/K/V."""
import torch

HEAD_DIM = 8
SCALE = HEAD_DIM ** -0.5


def reference_attention(q, k, v, seqlens_q, seqlens_k):
    """One sequence at a time, math in float64; queries are the last Lq of their Lk keys.

    q [sum Lq, H, D], k/v [sum Lk, Hkv, D] -> float64 [sum Lq, H, D].
    """
    outs, starts_k = [], torch.tensor([0] + seqlens_k).cumsum(0).tolist()
    for qi, start, len_q, len_k in zip(q.split(seqlens_q), starts_k, seqlens_q, seqlens_k):
        group = q.shape[1] // k.shape[1]
        ki, vi = (x[start:start + len_k].repeat_interleave(group, 1).double() for x in (k, v))
        scores = torch.einsum("qhd,khd->hqk", qi.double(), ki) * qi.shape[-1] ** -0.5
        visible = torch.arange(len_k) <= torch.arange(len_q)[:, None] + (len_k - len_q)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, vi))
    return torch.cat(outs)


def random_qkv(num_q, num_k, heads, kv_heads, dtype, seed=0):
    """q [num_q, heads, HEAD_DIM], k/v [num_k, kv_heads, HEAD_DIM] of standard normals."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_q, heads, HEAD_DIM, generator=g).to(dtype),
            torch.randn(num_k, kv_heads, HEAD_DIM, generator=g).to(dtype),
            torch.randn(num_k, kv_heads, HEAD_DIM, generator=g).to(dtype))


def paged(k, v, seqlens_k, block_size, seed=0):
    """k/v [sum Lk, Hkv, D] laid out in shuffled pages -> (k_cache, v_cache, block_tables int32).

    Unwritten slots hold NaN, so reading one shows up in the output."""
    blocks = [-(-n // block_size) for n in seqlens_k]
    order = torch.randperm(sum(blocks) + 3, generator=torch.Generator().manual_seed(seed))
    block_tables = torch.full((len(blocks), max(blocks)), -1, dtype=torch.int32)
    k_cache = torch.full((len(order), block_size, *k.shape[1:]), float("nan"), dtype=k.dtype)
    v_cache = k_cache.clone()
    used, begin = 0, 0
    for i, (num_blocks, len_k) in enumerate(zip(blocks, seqlens_k)):
        block_tables[i, :num_blocks] = order[used:used + num_blocks].int()
        slots = (block_tables[i, :num_blocks, None].long() * block_size + torch.arange(block_size)).flatten()
        k_cache.flatten(0, 1)[slots[:len_k]] = k[begin:begin + len_k]
        v_cache.flatten(0, 1)[slots[:len_k]] = v[begin:begin + len_k]
        used, begin = used + num_blocks, begin + len_k
    return k_cache, v_cache, block_tables
