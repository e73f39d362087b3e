"""Time of the sampler per decode step (`fusedrl.kernels.sample`: the split-row Triton kernels
where the model's kernels run, else the torch reference) at batch 1 / 32 / 256 over a
151936-token bf16 vocabulary: greedy, top-p 0.9, top-k 50 and min-p 0.1, next to one read of the
logits (a row max) and the bytes-per-second of that read. The script needs CUDA; `fusedrl bench
kernels` reports the same measurement (measure()) on any device, beside the eager reference.

    python bench/bench_sampler.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from fusedrl.kernels import sample
from fusedrl.kernels.sampling.sampler import SamplerWorkspace

VOCAB = 151936
BATCHES = (1, 32, 256)
MODES = {"greedy": dict(temperature=0.0), "top_p=0.9": dict(top_p=0.9), "top_k=50": dict(top_k=50),
         "min_p=0.1": dict(min_p=0.1)}


def gpu_us(fn, iters: int = 200) -> float:
    """Mean GPU time of fn() in microseconds (CUDA events around `iters` calls, after a warm-up)."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def sampling_args(batch: int, device, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """sample()'s per-row arguments after the logits: every row the same mode."""
    full = lambda v, dtype: torch.full((batch,), v, dtype=dtype, device=device)  # noqa: E731
    return (full(temperature, torch.float32), full(top_k, torch.int64), full(top_p, torch.float32),
            torch.arange(batch, device=device), full(200, torch.int64), full(min_p, torch.float32))


def model_logits(batch: int, vocab: int, device, dtype=torch.bfloat16) -> torch.Tensor:
    """[batch, vocab] model-like rows: a wide bulk and a few far-ahead tokens (a trained LM's
    logits are peaked)."""
    g = torch.Generator(device).manual_seed(batch)
    logits = torch.randn(batch, vocab, generator=g, device=device) * 2.5
    logits[:, :64] += 12 * torch.rand(batch, 64, generator=g, device=device)
    return logits.to(dtype)


def graphed(fn):
    """fn's device work captured once in a CUDA graph; returns a callable that replays it. The
    engine's decode step runs the sampler inside its captured graph, so a replay is what a decode
    step pays for it (no launch or dispatch cost on the host)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture: compiles, allocator pools
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(batch: int, vocab: int, device, timer_us, dtype=torch.bfloat16, sampler=sample,
            graph: bool = False) -> dict:
    """One batch's row: one_read_us (a row max), read_GBps, f"{mode}_us" per mode of MODES
    (timer_us(fn): microseconds per call of fn), top_p_over_greedy. sampler: sample()'s signature
    (the eager reference's too); graph: each mode's call captured in a CUDA graph with a workspace
    kept across calls (as the engine runs it) and the replay timed (CUDA only, `sample` only)."""
    logits = model_logits(batch, vocab, device, dtype)
    read = timer_us(lambda: logits.amax(-1))
    row = {"batch": batch, "one_read_us": read,
           "read_GBps": logits.numel() * logits.element_size() / read / 1e3}
    workspace = SamplerWorkspace(max(1, batch), device) if graph else None
    for name, kw in MODES.items():
        params = sampling_args(batch, device, **kw)
        call = (lambda: sampler(logits, *params, workspace=workspace)) if graph else (
            lambda: sampler(logits, *params))
        row[f"{name}_us"] = timer_us(graphed(call) if graph else call)
    row["top_p_over_greedy"] = row["top_p=0.9_us"] / row["greedy_us"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_sampler needs CUDA")
        return 1
    rows = []
    for batch in BATCHES:
        row = measure(batch, VOCAB, "cuda", gpu_us)
        rows.append(row)
        print(" | ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "vocab": VOCAB, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
