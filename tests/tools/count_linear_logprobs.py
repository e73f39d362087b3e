"""Count what linear_token_logprobs does per chunk, on the CPU: kernels launched (bench/launch_count
rules: each aten op and each Triton launch) and bytes moved (aten ops by bench/traffic_count's
rules, an out= argument counted as read too; Triton kernels by what they load and store inside,
tests/tools/traffic_kernels.py), forward and backward, at a small shape under TRITON_INTERPRET=1.

The counted shape is the target shape (default: the bar's N=16384, H=896, V=151936 bf16) with N,
H, V and the default row chunk all divided by --scale, so that the per-logit ratios (weight and
hidden re-reads per chunk: H / chunk) stay the target's; bytes per logit times the target's N x V
is then reported as an extrapolation to the target, labelled so, not a GPU measurement. Runs
against whatever `fusedrl` is installed, so the same script counts another checkout's version.

    TRITON_INTERPRET=1 python tests/tools/count_linear_logprobs.py [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter

import torch

if not torch.cuda.is_available():
    # Before any Triton kernel is defined. Never on a GPU machine: imported by the suite there, it
    # would turn every kernel defined later into an interpreted one, in every pytest worker.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedrl.kernels.rl.linear_logprobs as linear  # noqa: E402
from fusedrl.bench import harness  # noqa: E402
from fusedrl.bench.launch_count import LaunchCounter  # noqa: E402
from fusedrl.bench.traffic_count import FREE, op_bytes  # noqa: E402
from traffic_kernels import KernelTraffic  # noqa: E402


class _OpCounter(LaunchCounter):
    """LaunchCounter that also adds up the aten ops' bytes (read, written)."""

    def __init__(self):
        super().__init__()
        self.read = self.written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counted = not (self._inside_op or func in FREE or getattr(func, "is_view", False))
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if counted:
            read, written = op_bytes(func, args, kwargs, out)
            self.read, self.written = self.read + read, self.written + written
        return out


def _python_function(op):
    """The Python function behind one of linear_logprobs' ops, run below the op (its launches alone
    counted): a DirectOp's `fn`; an older checkout's torch CustomOpDef's `_init_fn`."""
    return op.fn if hasattr(op, "fn") else op._init_fn


def _count(fn) -> dict:
    with KernelTraffic() as triton_bytes, _OpCounter() as ops:
        result = fn()
    stored = sum(triton_bytes.stored.values())
    return {"launches": ops.launches, "ops": dict(Counter(ops.names)),
            "aten_bytes": ops.read + ops.written,
            "triton_bytes": triton_bytes.total_loaded() + stored, "triton_stored": stored,
            "result": result}


def count(n_rows: int, hidden_size: int, vocab: int, chunk_size: int, dtype: torch.dtype,
          fuse_matmul: bool = False) -> dict:
    """Launches and bytes of one forward and one backward (the custom ops' bodies, called directly so
    their inner ops are seen) at this shape, through cuBLAS + the row kernels or the fused GEMMs.
    The fused kernels' loads are their GEMM operand tiles (on a GPU mostly L2 hits, re-read per
    tile); what they store is the HBM traffic the fusion is about."""
    torch.manual_seed(0)
    hidden = torch.randn(n_rows, hidden_size).to(dtype)
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, (n_rows,))
    forward, backward = _python_function(linear._fwd_op), _python_function(linear._bwd_op)
    fwd = _count(lambda: forward(hidden, weight, None, labels, 1.0, -100, False, chunk_size,
                                 fuse_matmul))
    logp, entropy, lse = fwd.pop("result")
    grad_logp, no_grad_entropy = torch.ones_like(logp), logp.new_empty(0)
    bwd = _count(lambda: backward(grad_logp, no_grad_entropy, hidden, weight, None, labels, lse,
                                  entropy, 1.0, -100, chunk_size, True, fuse_matmul))
    bwd.pop("result")
    return {"forward": fwd, "backward": bwd}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="16384,896,151936", help="N,H,V of the shape to scale to")
    parser.add_argument("--scale", type=int, default=16, help="divide N, H, V and the chunk by this")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    n, h, v = map(int, args.target.split(","))
    target_chunk = linear.default_chunk_size(n, v)
    rows, hidden, vocab = n // args.scale, h // args.scale, v // args.scale
    chunk = max(1, target_chunk // args.scale)
    logits = rows * vocab
    report = {"counted_shape": {"rows": rows, "hidden": hidden, "vocab": vocab, "row_chunk": chunk,
                                "dtype": "bfloat16"},
              "target": {"rows": n, "hidden": h, "vocab": v, "row_chunk": target_chunk}}
    fused_ok = "fuse_matmul" in _python_function(linear._fwd_op).__code__.co_varnames  # older checkouts: cuBLAS only
    for path in ("cublas", "fused") if fused_ok else ("cublas",):
        counted = count(rows, hidden, vocab, chunk, torch.bfloat16, **({"fuse_matmul": path == "fused"} if fused_ok else {}))
        for way, c in counted.items():
            chunks = -(-rows // chunk)
            if path == "fused" and way == "forward":
                chunks = 1  # no row chunks: one pass of the fused GEMM (and its combine)
            if way == "backward" and hasattr(linear, "vocab_chunk_size"):  # vocabulary chunks backward
                chunks = -(-vocab // linear.vocab_chunk_size(rows, vocab, chunk))
            total = c["aten_bytes"] + c["triton_bytes"]
            c.update(chunks=chunks, launches_per_chunk=c["launches"] / chunks, bytes=total,
                     bytes_per_chunk=total / chunks, bytes_per_logit=total / logits,
                     stored_per_logit=c["triton_stored"] / logits,
                     target_gib_extrapolated=total / logits * n * v / 2**30)
            report.setdefault(path, {})[way] = c
            print(f"{path} {way}: {c['launches']} launches in {chunks} chunks ({c['launches'] / chunks:.2f} per "
                  f"chunk): {c['ops']}; {total / 2**20:.1f} MiB ({total / chunks / 2**20:.2f} per chunk; aten "
                  f"{c['aten_bytes'] / 2**20:.1f}, triton {c['triton_bytes'] / 2**20:.1f}, of which stored "
                  f"{c['triton_stored'] / 2**20:.1f}) = {total / logits:.2f} bytes per logit -> "
                  f"{c['target_gib_extrapolated']:.1f} GiB at N={n} H={h} V={v} (extrapolated)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": harness.run_metadata(torch.device("cpu")), **report}, f, indent=2)
    return report


if __name__ == "__main__":
    main()
