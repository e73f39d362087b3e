"""Plain PyTorch references of the model-scale ops (a decoder's norms, RoPE, SiLU*up, the decode
path's fused norm + projection and its paged KV cache): the oracles of their kernels and the "torch"
backend of the model's forward. Re-exported by the package: use them as
``fusedrl.kernels.reference.<op>``.

Each is the eager composition transformers runs, op for op (so the torch backend gives transformers'
numbers), and takes the public op's arguments. The paged-cache ones check their arguments as the
Triton paths do (the engine calls them directly on CPU tensors).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import checks


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm of x [..., C] with weight [C] (fp32 statistics, rounded to x's dtype before the
    weight); with ``residual``, (RMSNorm(x + residual), x + residual)."""
    if residual is not None:
        total = residual + x
        return rms_norm(total, weight, eps), total
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def silu_mul(gate_up):
    """SiLU(gate) * up of the packed gate_up [..., 2C] -> [..., C]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotate(x, cos, sin):
    """x [N, heads, D] rotated by cos/sin [N, D] (rotate-half, x's dtype)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope(q, k, cos, sin):
    """q [N, Hq, D] and k [N, Hk, D] rotated by the angles of cos/sin [N, D] -> (q, k)."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def mrope(q, k, cos_table, sin_table, positions, axes):
    """q [N, Hq, D], k [N, Hk, D] rotated by M-RoPE: column c of token n at the angle of table row
    positions[axes[c mod D/2], n] (positions [3, N], axes [D / 2]), transformers' composition of
    the three axes' rows -> (q, k)."""
    rows_cos, rows_sin = (t[positions.long()] for t in (cos_table, sin_table))  # [3, N, D]
    column_axes = torch.cat((axes, axes)).long().view(1, 1, -1)
    cos, sin = (r.take_along_dim(column_axes, dim=0)[0] for r in (rows_cos, rows_sin))
    return rope(q, k, cos, sin)


def norm_linear(x, residual, norm_weight, eps, weight, bias=None, glu=False):
    """(F.linear(RMSNorm(x + residual)), x + residual) for x, residual [M, K] (residual may be None:
    the stream is x), with SiLU(gate) * up of the packed output when glu."""
    normed, total = rms_norm(x, norm_weight, eps, residual) if residual is not None else (
        rms_norm(x, norm_weight, eps), x)
    y = F.linear(normed, weight, bias)
    return (silu_mul(y) if glu else y), total


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write k, v [N, Hkv, D] into the caches [blocks, page, Hkv, D] at slot_mapping [N] (slot -1: a
    padding row, skipped), through advanced indexing."""
    checks.check_kv_store(k, v, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k.shape[1:])[slots] = k[keep]
    v_cache.view(-1, *v.shape[1:])[slots] = v[keep]


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Attention of q [B, H, D] (one token per sequence) over its paged context: gather the pages,
    mask, SDPA -> [B, H, D]."""
    checks.check_paged_decode(q, k_cache, v_cache, block_tables, context_lens)
    # Whole pages in table order: position p of a row is entry p of its flattened pages
    # (attention/pages.py's addressing, gathered a page at a time rather than a slot at a time).
    k = k_cache[block_tables.long()].flatten(1, 2).transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache[block_tables.long()].flatten(1, 2).transpose(1, 2)
    mask = torch.arange(k.shape[2], device=q.device) < context_lens[:, None]  # [B, L]
    # Slots past a sequence's length (and padding entries, -1, which gather the last block) hold
    # whatever the pool held: possibly NaN, and a masked-out NaN still poisons softmax(...) @ v.
    unwritten = ~mask[:, None, :, None]
    k, v = k.masked_fill(unwritten, 0), v.masked_fill(unwritten, 0)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
    return out.squeeze(2)  # [B, H, D]


def rope_store_decode(q, k, v, cos_table, sin_table, positions, k_cache, v_cache, slot_mapping,
                      block_tables, context_lens, scale):
    """A decode step's attention: RoPE of q, k at positions [B] (rows of the cos/sin tables [L, D]),
    k and v stored, then paged_decode -> [B, H, D]."""
    rows = positions.clamp(min=0)
    q, k = rope(q, k, cos_table[rows], sin_table[rows])
    store_kv(k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping)
    return paged_decode(q.contiguous(), k_cache, v_cache, block_tables, context_lens, scale)
