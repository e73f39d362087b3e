"""Attention over many sequences: the engine's paths against a per-sequence SDPA loop, on
two shapes:

- train: forward + backward of a packed batch of 128 sequences, 16,384 tokens (lengths 64-192).
- prefill: 32 prompts x 4 samples with prompts of 256-768 tokens in 16-token pages; the first sample
  of each prompt prefills it all, the other three only their last partial page and read the
  shared prefix from the pages (what the block manager's prefix sharing leaves them).

Implementations: "loop" (one SDPA call per sequence, the code before), "padded groups"
(kernels/attention/padded.py, the CPU path), "engine" (kernels/attention/paths.py's choice on this
device: a varlen flash-attention call on CUDA in bf16). Reported: median ms, attention ops
dispatched per call (forward and backward), speed-up over the loop, and the causal attention's
FLOPs (what no implementation avoids: 4 per visible query-key pair, head and channel forward, 2.5x
that backward). Printed as a table, saved as JSON; `fusedrl bench kernels` reports the same
measurement (measure()) as rows of its schema.

    python bench/bench_attention.py               # headline: bf16, 32 query heads over 8, head dim 128
    python bench/bench_attention.py --quick       # fp32, 4 heads over 2, 1/16 of the sequences (CPU)
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fusedrl.bench import harness
from fusedrl.kernels.attention import AttentionMetadata, paths
from fusedrl.kernels.attention.padded import packed_causal_attention, paged_prefill_attention

BLOCK_SIZE = 16


class _AttentionOps(TorchDispatchMode):
    """Counts the attention ops dispatched, forward and backward: aten's SDPA and flash ops, torch's
    varlen custom op (torch_attn::_varlen_attn) and flash-attn's."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += "attention" in func.name() or "attn" in func.name()
        return func(*args, **(kwargs or {}))


def _lengths(count, low, high, g) -> list[int]:
    return torch.randint(low, high + 1, (count,), generator=g).tolist()


def _loop(q, k, v, seqlens_q, seqlens_k, scale):
    """The replaced code: one SDPA per sequence, queries the last Lq of their Lk keys."""
    outs, start = [], 0
    for qi, len_q, len_k in zip(q.split(seqlens_q), seqlens_q, seqlens_k):
        ki, vi = (x[start:start + len_k].transpose(0, 1)[None] for x in (k, v))
        visible = torch.arange(len_k, device=q.device) <= torch.arange(len_q, device=q.device)[:, None] + len_k - len_q
        outs.append(F.scaled_dot_product_attention(qi.transpose(0, 1)[None], ki, vi, attn_mask=visible,
                                                   scale=scale, enable_gqa=True)[0].transpose(0, 1))
        start += len_k
    return torch.cat(outs)


def causal_flops(seqlens_q, seqlens_k, heads, head_dim) -> int:
    """Forward FLOPs of causal attention, queries the last Lq of their Lk keys: QK^T and PV, 2 each
    per visible (query, key) pair, head and channel."""
    pairs = sum(lq * (lk - lq) + lq * (lq + 1) // 2 for lq, lk in zip(seqlens_q, seqlens_k))
    return 4 * heads * head_dim * pairs


def train_case(quick, device, dtype, heads, kv_heads, head_dim):
    """(name, {impl: thunk}, FLOPs) for forward + backward of one packed batch."""
    g = torch.Generator().manual_seed(0)
    lens = _lengths(8 if quick else 128, 64, 192, g)
    n, scale = sum(lens), head_dim ** -0.5
    q, k, v = (torch.randn(n, h, head_dim, device=device, dtype=dtype, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    meta = AttentionMetadata.packed(lens, device)
    grad = torch.randn(n, heads, head_dim, device=device, dtype=dtype)

    def backward(fn):
        return lambda: torch.autograd.backward(fn(), grad)
    impls = {"loop": backward(lambda: _loop(q, k, v, lens, lens, scale)),
             "padded groups": backward(lambda: packed_causal_attention(
                 q, k, v, paths._padded_plan(meta, device), scale)),
             "engine": backward(lambda: paths.varlen_attention(q, k, v, meta))}
    flops = causal_flops(lens, lens, heads, head_dim) * 7 // 2  # the backward: 2.5x the forward
    return f"train fwd+bwd: {len(lens)} seqs, {n} tokens", impls, flops


def prefill_case(quick, device, dtype, heads, kv_heads, head_dim):
    """(name, {impl: thunk}, FLOPs) for the prefill of n samples per prompt over shared prefix
    pages."""
    g = torch.Generator().manual_seed(1)
    prompts = _lengths(2 if quick else 32, 32 if quick else 256, 96 if quick else 768, g)
    seqlens_k = [p for p in prompts for _ in range(4)]
    cached = [0 if i % 4 == 0 else (p - 1) // BLOCK_SIZE * BLOCK_SIZE for i, p in enumerate(seqlens_k)]
    seqlens_q = [p - c for p, c in zip(seqlens_k, cached)]
    scale = head_dim ** -0.5
    q = torch.randn(sum(seqlens_q), heads, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(sum(seqlens_k), kv_heads, head_dim, device=device, dtype=dtype) for _ in range(2))
    # Each sequence in its own pages (shuffled); sharing would change what is read, not how much.
    num_blocks = [-(-n // BLOCK_SIZE) for n in seqlens_k]
    pool = torch.randperm(sum(num_blocks), generator=g).to(device)
    block_tables = torch.full((len(seqlens_k), max(num_blocks)), 0, dtype=torch.int32, device=device)
    k_cache = torch.zeros(len(pool), BLOCK_SIZE, kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    used = start = 0
    for i, (blocks, len_k) in enumerate(zip(num_blocks, seqlens_k)):
        block_tables[i, :blocks] = pool[used:used + blocks]
        slots = (block_tables[i, :blocks, None].long() * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device=device))
        k_cache.flatten(0, 1)[slots.flatten()[:len_k]] = k[start:start + len_k]
        v_cache.flatten(0, 1)[slots.flatten()[:len_k]] = v[start:start + len_k]
        used, start = used + blocks, start + len_k
    cu_q, cu_k = (torch.tensor([0] + lens, device=device).cumsum(0).int() for lens in (seqlens_q, seqlens_k))
    meta = AttentionMetadata(seqlens_q=seqlens_q, seqlens_k=seqlens_k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                             block_tables=block_tables)
    impls = {"loop": lambda: _loop(q, k, v, seqlens_q, seqlens_k, scale),
             "padded groups": lambda: paged_prefill_attention(
                 q, k_cache, v_cache, block_tables, paths._padded_plan(meta, device), scale),
             "engine": lambda: paths.prefill_attention(q, None, None, k_cache, v_cache, meta)}
    name = f"prefill: {len(prompts)} prompts x 4, {sum(seqlens_q)} new of {sum(seqlens_k)} tokens"
    return name, impls, causal_flops(seqlens_q, seqlens_k, heads, head_dim)


def shape(quick: bool, device: torch.device) -> tuple[torch.dtype, tuple[int, int, int]]:
    """The dtype and (query heads, K/V heads, head dim): the headline's, or --quick's."""
    # CUDA's fused attention kernels take half types: fp32 queries with fewer K/V heads (GQA) fall
    # back to SDPA's math decomposition (matmul, softmax, matmul), which has no attention op to count.
    dtype = torch.float32 if quick and device.type == "cpu" else torch.bfloat16
    return dtype, ((4, 2, 64) if quick else (32, 8, 128))


def measure(quick: bool, device: torch.device, budget: float) -> list[dict]:
    """Per case and implementation: case, impl, ms (median), attention_ops, speedup (over the
    loop), flops (the causal attention's) and on CUDA peak_extra_mib (max_memory_allocated above
    the allocated, during one call)."""
    dtype, heads = shape(quick, device)
    rows = []
    for make in (train_case, prefill_case):
        name, impls, flops = make(quick, device, dtype, *heads)
        loop_ms = None
        for impl, thunk in impls.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            with _AttentionOps() as ops:
                thunk()
            row = {"case": name, "impl": impl, "attention_ops": ops.count, "flops": flops}
            if device.type == "cuda":
                row["peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            row["ms"] = harness.time_ms(thunk, device, budget_s=budget)
            loop_ms = loop_ms or row["ms"]
            rows.append({**row, "speedup": loop_ms / row["ms"]})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (fp32 on the CPU, bf16 on CUDA)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of repetitions per timing")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = measure(args.quick, device, args.budget)
    print(harness.format_table(rows, [("case", "case"), ("impl", "impl"), ("ms", "ms"),
                                      ("attention_ops", "attention ops"), ("speedup", "x loop")]))
    if args.json:
        dtype, heads = shape(args.quick, device)
        harness.write_json(args.json, {"meta": harness.run_metadata(device), "dtype": str(dtype),
                                        "heads": heads, "results": rows})


if __name__ == "__main__":
    main()
