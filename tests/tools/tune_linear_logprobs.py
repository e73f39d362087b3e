"""Tile shapes of linear_token_logprobs' fused GEMMs, timed side by side at one shape: the fused
forward (logits folded into log-sum-exp states) and the fused backward recompute (logits turned into
their gradient and written once) per FusedTiles, against cuBLAS's plain GEMM of the same FLOPs (the
logits [N, V] = hidden @ weight.T made in the same vocabulary chunks, written and nothing else).
What it decides: `linear_logprobs.fused_tiles`'s shapes, and whether the fused GEMM keeps up with
cuBLAS at all (bench_kernels' "fusedrl cuBLAS" row is the whole-op comparison).

    python tests/tools/tune_linear_logprobs.py [--shape 16384,896,151936] [--json OUT.json]
    TRITON_INTERPRET=1 python tests/tools/tune_linear_logprobs.py --quick   # a smoke test on the CPU
"""
from __future__ import annotations

import argparse

import torch

from fusedrl.bench import harness
from fusedrl.kernels.rl import linear_logprobs as linear
from fusedrl.kernels.rl.linear_logprobs import FusedTiles

# (block_m, block_n, block_k, num_warps, num_stages): the default first, then the usual Hopper and
# Ampere GEMM shapes with one thing changed at a time.
CANDIDATES = [FusedTiles(128, 128, 64, 8, 3), FusedTiles(128, 128, 64, 8, 4), FusedTiles(128, 128, 64, 4, 3),
              FusedTiles(128, 256, 64, 8, 3), FusedTiles(256, 128, 64, 8, 3), FusedTiles(64, 128, 64, 4, 4),
              FusedTiles(128, 64, 64, 4, 4), FusedTiles(128, 128, 32, 8, 4)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="16384,896,151936", help="N,H,V")
    parser.add_argument("--quick", action="store_true", help="a tiny shape and two candidates (CPU smoke test)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of repetitions per timing")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    n, h, v = (64, 32, 700) if args.quick else map(int, args.shape.split(","))
    candidates = CANDIDATES[:2] if args.quick else CANDIDATES
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=dtype)
    weight = torch.randn(v, h, device=device, dtype=dtype) / h**0.5
    labels = torch.randint(0, v, (n,), device=device)
    grad_logp = torch.randn(n, device=device)
    chunk_cols = linear.vocab_chunk_size(n, v, linear.default_chunk_size(n, v))
    spans = [(s, min(s + chunk_cols, v)) for s in range(0, v, chunk_cols)]
    gemm_flops = 2 * n * h * v
    meta = harness.run_metadata(device)
    peak = harness.matmul_tflops(device, 8192 if device.type == "cuda" else 256)
    _, _, lse = linear.forward_fused(hidden, weight, None, labels, 1.0, -100, False)

    def timed(fn):
        return harness.time_ms(fn, device, budget_s=args.budget)

    rows = [{"way": "cuBLAS logits (same chunks)", "tiles": None,
             "ms": timed(lambda: [torch.nn.functional.linear(hidden, weight[s:e]) for s, e in spans])}]
    failed = []
    for tiles in candidates:
        try:
            fwd = timed(lambda: linear.forward_fused(hidden, weight, None, labels, 1.0, -100, False, tiles=tiles))
            bwd = timed(lambda: [linear.fused_logit_grad(grad_logp, None, hidden, weight, None, labels, lse, lse,
                                                         1.0, -100, s, e, tiles=tiles) for s, e in spans])
        except Exception as error:  # e.g. out of shared memory: a result of the sweep, not its end
            failed.append({"tiles": tiles._asdict(), "error": f"{type(error).__name__}: {error}"[:300]})
            print(f"{tiles}: {failed[-1]['error']}")
            continue
        rows += [{"way": "fused forward", "tiles": tiles._asdict(), "ms": fwd},
                 {"way": "fused backward recompute", "tiles": tiles._asdict(), "ms": bwd}]
    for row in rows:
        row["tflops"] = gemm_flops / (row["ms"] * 1e-3) / 1e12
        row["of_matmul_peak"] = row["tflops"] / peak
        tiles = row["tiles"]
        label = "-" if tiles is None else "x".join(str(tiles[k]) for k in ("block_m", "block_n", "block_k")) + \
            f" w{tiles['num_warps']} s{tiles['num_stages']}"
        print(f"{row['way']:<28} {label:<18} {row['ms']:9.3f} ms {row['tflops']:8.1f} TFLOP/s "
              f"({row['of_matmul_peak']:.2f} of the {peak:.0f} TFLOP/s matmul peak)")
    payload = {"meta": {**meta, "shape": {"N": n, "H": h, "V": v}, "matmul_tflops": peak,
                        "vocab_chunk": chunk_cols}, "results": rows, "failed": failed}
    if args.json:
        harness.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
