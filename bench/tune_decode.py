"""The decode step's own kernels at other launch shapes, timed side by side at the Qwen2.5-0.5B
shape in bf16: what decides `norm_linear.tile_shape` and `paged.decode_splits`, which were set by
reasoning, never by a GPU's timings.

The H100 profile of a batch-1 decode step (bench/results/2026-11-27-h100-2) put 45% of its device
time in the fused norm + q/k/v and norm + gate/up kernel (11 us a call, about 0.9 TB/s), 20% in
cuBLAS's GEMVs for o and down (two kernels each: split-K and its reduction) and 19% in the paged
decode and its combine of splits. At a few rows a kernel is bound by how many bytes of weight it
has in flight, which the tile, the warps and the pipeline's stages set. Rows, each the time of one
call inside a CUDA graph of back-to-back calls (as the decode graph runs them, no launch cost)
whose operands rotate through enough copies (128 MB) to miss L2, as a step's 24 layers do:

- per projection (q/k/v and gate/up: norm fused; o and down: the same kernel with a norm as a
  stand-in for a GEMV of their shape) and rows (1 and 256): cuBLAS (the norm kernel, then the GEMM,
  then SiLU * up: the engine's unfused decode; for o and down, which the engine always gives
  cuBLAS, the GEMM alone), then norm_linear at tile_shape's tiles and at each alternative of
  `candidates`; its weight bytes over the time against the datasheet's bandwidth;
- the paged decode with RoPE and the KV store (one new token per sequence, contexts of 384
  tokens, block tables as wide as a decode graph's) at batch 1 and 256, at each split count.

Every alternative is first checked against the default launch's output (bf16 rounding apart); one
that differs, or fails to compile, is a row saying so, never a timing. Each row is appended to
OUT/tune_decode.jsonl and OUT/tune_decode.md is rewritten as it comes, so a stage cut at its
deadline keeps what it measured.

    python -m fusedrl.bench.tune_decode --out DIR                            # GPU
    TRITON_INTERPRET=1 python -m fusedrl.bench.tune_decode --out DIR --quick # CPU smoke test
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fusedrl import kernels
from fusedrl.engine.runs.durable import write_text_atomic
from fusedrl.kernels.attention.paged import decode_splits, rope_store_decode_triton, sm_count
from fusedrl.kernels.model.norm_linear import Tiles, launch, tile_shape

from . import devices, harness, timing
from .bench_sampler import graphed


@dataclasses.dataclass(frozen=True)
class Shape:
    """The model's decode sizes: hidden, q/k/v outputs, MLP width, attention heads and head size,
    the page, the timed context, the block tables' width in pages (a decode graph's: the model's
    context) and the row counts timed."""
    hidden: int
    qkv: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    page: int
    context: int
    table_pages: int
    rows: tuple[int, ...]


# batch 256's rows first: the H200 visit (bench/results/2026-11-28-h200) timed batch 1's and ran
# out of its seconds before these, where norm + linear is half of a decode step
QWEN_05B = Shape(896, 1152, 4864, 14, 2, 64, 16, 384, 32768 // 16, (256, 1))
QUICK = Shape(64, 128, 96, 4, 2, 16, 16, 40, 8, (1,))
REPS = 20  # calls in one captured graph, at least
L2_MISS_BYTES = 128 << 20  # operands rotated through at least this much (an H100's L2: 50 MB)
MAX_COPIES = 512  # operand sets at most (a batch-1 decode's 197 KB of K/V: 512 x 25 pages)
SPLITS = (1, 2, 4, 8, 16, 32, 64)
GPU_SMS = 132  # decode_splits' SM count off a GPU (an H100's), for the label of its choice


def candidates(rows: int, n_out: int) -> list[Tiles]:
    """tile_shape's tiles first, then alternatives changing what sets the bytes in flight: at one
    row the other GEMV tiles (a row tile of 1, tile_dot's sums on the CUDA cores: narrower or wider
    column tiles, fewer warps, more stages, a longer K step, the K steps of 512 that were the
    default before), then a tensor-core tile; at 2 to 16 and more rows a longer K step, more
    stages, narrower or wider column tiles, more warps."""
    base = tile_shape(rows, n_out)
    if rows == 1:
        # wider and narrower column tiles, fewer warps, a second stage, a longer K step (down's
        # 4,864), the GEMV before this one (K steps of 512) and the tensor-core tiles of 2-16 rows
        # that were one row's before the GEMV (Triton's default warps and stages, stated)
        m, n, k = tile_shape(2, n_out)[:3]
        bn, bk = base.block_n, base.block_k
        others = [Tiles(1, 2 * bn, bk, 8, 1), Tiles(1, max(1, bn // 2), bk, 8, 1),
                  Tiles(1, bn, bk, 4, 1), Tiles(1, bn, bk, 8, 2), Tiles(1, bn, 2 * bk, 8, 1),
                  Tiles(1, 4 if n_out <= 2048 else 8, 512, 4, 2), Tiles(m, n, k, 4, 3)]
        return [base] + [t for t in dict.fromkeys(others) if t != base]
    m, n, k = base.block_m, base.block_n, base.block_k
    if rows <= 16:
        others = [Tiles(m, n, 2 * k, 4, 3), Tiles(m, n, k, 4, 5), Tiles(m, 2 * n, k, 4, 4),
                  Tiles(m, n, k // 2, 4, 6), Tiles(m, 2 * n, 2 * k, 8, 3)]
    else:
        others = [Tiles(m, 2 * n, k, 4, 3), Tiles(2 * m, n, k, 8, 3), Tiles(m, n, 2 * k, 4, 3),
                  Tiles(m, n, k, 4, 4)]
    return [base] + others


def projections(shape: Shape) -> list[tuple]:
    """(name, output rows of the weight, K, bias, glu, fused) of each decode projection: fused, the
    engine runs it in norm_linear (else cuBLAS's GEMM alone, and norm_linear, with a residual so
    that it copies nothing, stands in for a GEMV kernel of that shape)."""
    return [("q/k/v", shape.qkv, shape.hidden, True, False, True),
            ("gate/up", 2 * shape.intermediate, shape.hidden, False, True, True),
            ("o (stand-in)", shape.hidden, shape.hidden, False, False, False),
            ("down (stand-in)", shape.hidden, shape.intermediate, False, False, False)]


class Writer:
    """Rows appended to OUT/tune_decode.jsonl (its first line the meta), OUT/tune_decode.md
    rewritten after each, one line printed."""

    def __init__(self, out: Path, meta: dict):
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.md = out / "tune_decode.jsonl", out / "tune_decode.md"
        self.meta, self.rows = meta, []
        self.jsonl.write_text(json.dumps({"meta": meta}) + "\n")

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        write_text_atomic(self.md, self.table())
        print(" | ".join(_cells(row)), flush=True)

    def table(self) -> str:
        head = ["case", "rows", "way", "launch", "us", "p20-p80 us", "GB/s", "of bandwidth",
                "vs default", "vs cuBLAS"]
        lines = [f"# Decode kernels at other launch shapes ({self.meta['device']}, commit "
                 f"{self.meta['git_commit']})", "",
                 f"Each time is one call's, in a CUDA graph of at least {self.meta['reps']} "
                 "calls whose operands rotate through 128 MB (a row's `calls`; the calls "
                 f"themselves off CUDA); bandwidth: {self.meta['limit']}.", "",
                 "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        lines += ["| " + " | ".join(_cells(r)) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"


def _cells(row: dict) -> list[str]:
    def fmt(key, spec):
        return format(row[key], spec) if row.get(key) is not None else "-"
    timed = row.get("us") is not None
    return [row["case"], str(row["rows"]), row["way"], row["launch"],
            fmt("us", ".2f") if timed else row["status"],
            f"{row['us_p20']:.2f}-{row['us_p80']:.2f}" if timed else "-",
            fmt("GBps", ".0f"), fmt("of_bandwidth", ".2f"), fmt("vs_default", ".2f"),
            fmt("vs_cublas", ".2f")]


@dataclasses.dataclass(frozen=True)
class Sweep:
    """How the rows are taken: on `device` in `dtype`, at least `reps` calls a timed graph, each
    timing within `budget_s`, none started after `deadline` (perf_counter), bandwidth
    `limit_bps`."""
    device: torch.device
    dtype: torch.dtype
    reps: int
    budget_s: float
    deadline: float
    limit_bps: float
    quick: bool = False  # two launches of each kind (a smoke test)

    def trimmed(self, options: list) -> list:
        return options[:2] if self.quick else options

    def copies(self, nbytes: int) -> int:
        """Operand sets of `nbytes` a graph rotates through: L2_MISS_BYTES of them on CUDA (at most
        MAX_COPIES), so each call reads its operands from memory as a decode step's layers do;
        one elsewhere."""
        if self.device.type != "cuda":
            return 1
        return max(1, min(MAX_COPIES, -(-L2_MISS_BYTES // nbytes)))

    def calls(self, copies: int) -> int:
        """Calls in one timed graph: every operand set once, at least `reps`."""
        return max(self.reps, copies)

    def timed(self, call) -> timing.Timing:
        """Seconds per replay of `call`: a CUDA graph of it replayed on CUDA, the call itself
        elsewhere."""
        run = graphed(call) if self.device.type == "cuda" else call
        return timing.measure(run, self.device, budget_s=self.budget_s)

    def figures(self, t: timing.Timing, calls: int, nbytes: int) -> dict:
        """Microseconds per call of a timing of `calls` calls (median, p20, p80, n), and `nbytes`
        a call over that time."""
        us = t.median_s / calls * 1e6
        return {"us": us, "us_p20": t.p20_s / calls * 1e6, "us_p80": t.p80_s / calls * 1e6,
                "n": t.n, "GBps": nbytes / us / 1e3,
                "of_bandwidth": nbytes / us * 1e6 / self.limit_bps}

    def late(self) -> bool:
        return time.perf_counter() > self.deadline


def label(tiles: Tiles) -> str:
    """BLOCK_M x BLOCK_N x BLOCK_K, and the warps and stages when set."""
    shown = "x".join(str(v) for v in tiles[:3])
    return shown + (f" w{tiles.num_warps}" if tiles.num_warps else "") + (
        f" s{tiles.num_stages}" if tiles.num_stages else "")


def gemv_rows(shape: Shape, rows: int, sweep: Sweep, writer: Writer) -> None:
    """What the engine's unfused decode runs (the norm kernel, cuBLAS's GEMM and SiLU * up; for
    o and down the GEMM alone), then norm_linear's candidates, for each projection at `rows` rows;
    the weights rotate through sweep.copies of them."""
    for name, n_w, k, has_bias, glu, fused in projections(shape):
        way = ("norm kernel + " if fused else "") + "GEMM" + (" + SiLU * up" if glu else "")
        tiles_list = sweep.trimmed(candidates(rows, n_w // 2 if glu else n_w))
        if sweep.late():  # every row says so, before any operand is made
            for impl, launch_label in [("cuBLAS", way)] + [("norm_linear", label(t))
                                                          for t in tiles_list]:
                writer.add({"case": name, "rows": rows, "way": impl, "launch": launch_label,
                            "status": "not run: time"})
            continue
        g = torch.Generator(sweep.device).manual_seed(n_w * 7 + k + rows)
        dev = dict(generator=g, device=sweep.device)  # drawn on the device, where they are used
        weight = (torch.randn(n_w, k, **dev) / k ** 0.5).to(sweep.dtype)
        nbytes = weight.numel() * weight.element_size()
        weights = [weight] + [weight.clone() for _ in range(sweep.copies(nbytes) - 1)]
        calls = sweep.calls(len(weights))
        x, residual, norm_w, bias = (
            t.to(sweep.dtype) for t in (
                torch.randn(rows, k, **dev), torch.randn(rows, k, **dev),
                1 + torch.randn(k, **dev) / 10, torch.randn(n_w, **dev)))
        bias = bias if has_bias else None

        def row(way, launch_label, **extra):
            return {"case": name, "rows": rows, "way": way, "launch": launch_label,
                    "calls": calls, **extra}

        def unfused():
            for i in range(calls):
                h = kernels.rms_norm(x, norm_w, 1e-6, residual)[0] if fused else x
                y = F.linear(h, weights[i % len(weights)], bias)
                if glu:
                    kernels.silu_mul(y)

        baseline = sweep.timed(unfused)
        writer.add(row("cuBLAS", way, **sweep.figures(baseline, calls, nbytes)))
        tile_rows(sweep, writer, tiles_list, row, baseline,
                  nbytes, lambda tiles, w: launch(x, residual, norm_w, 1e-6, w, bias, glu,
                                                  tiles)[0], weights)


def tile_rows(sweep: Sweep, writer: Writer, tiles_list: list[Tiles], row, baseline, nbytes: int,
              call, weights: list[torch.Tensor]) -> None:
    """norm_linear at each of `tiles_list` (the default first): checked against the default's
    output, then timed over the weights (sweep.calls of them); call(tiles, weight) -> the
    output."""
    reference, default_us = None, None
    calls = sweep.calls(len(weights))
    for tiles in tiles_list:
        if sweep.late():
            writer.add(row("norm_linear", label(tiles), status="not run: time"))
            continue
        try:
            out = call(tiles, weights[0]).float()
            if reference is not None and not torch.allclose(out, reference, atol=3e-2, rtol=3e-2):
                writer.add(row("norm_linear", label(tiles),
                               status="wrong: differs from the default"))
                continue
            reference = out if reference is None else reference
            t = sweep.timed(lambda: [call(tiles, weights[i % len(weights)])
                                     for i in range(calls)])
        except Exception as error:  # out of resources at this launch: a finding, not the end
            writer.add(row("norm_linear", label(tiles),
                           status=f"failed: {type(error).__name__}: {error}"[:200]))
            continue
        figures = sweep.figures(t, calls, nbytes)
        default_us = default_us or figures["us"]
        writer.add(row("norm_linear", label(tiles), **figures, tiles=tiles._asdict(),
                       default=tiles is tiles_list[0], vs_default=default_us / figures["us"],
                       vs_cublas=baseline.median_s / t.median_s))


def decode_rows(shape: Shape, batch: int, sweep: Sweep, writer: Writer) -> None:
    """The paged decode (RoPE and store in the launch) of `batch` sequences at each split count:
    contexts of shape.context tokens, tables shape.table_pages wide, the calls rotating through
    sweep.copies sets of pages."""
    device, dtype = sweep.device, sweep.dtype
    default = decode_splits(batch * shape.kv_heads, shape.table_pages, shape.page,
                            sm_count(device) or GPU_SMS)
    counts = sweep.trimmed(sorted(set(SPLITS) | {default}, key=lambda s: (s != default, s)))

    def row_of(splits, **extra):
        return {"case": "paged decode + RoPE + store", "rows": batch, "way": "paged decode",
                "launch": f"{splits} splits" + (" (decode_splits')" * (splits == default)),
                "splits": splits, "default": splits == default, **extra}
    if sweep.late():  # every row says so, before the pages are made
        for splits in counts:
            writer.add(row_of(splits, status="not run: time"))
        return
    pages_each = -(-(shape.context + 1) // shape.page)
    nbytes = 2 * batch * (shape.context + 1) * shape.kv_heads * shape.head_dim * (
        torch.finfo(dtype).bits // 8)
    copies = sweep.copies(nbytes)
    calls = sweep.calls(copies)
    g = torch.Generator(device).manual_seed(batch)
    dev = dict(generator=g, device=device)  # drawn on the device: the caches are 128 MB and more
    k_cache, v_cache = (
        torch.randn(copies * batch * pages_each + 1, shape.page, shape.kv_heads,
                    shape.head_dim, **dev).to(dtype) for _ in range(2))
    # set c's sequence b holds pages 1 + (c * batch + b) * pages_each onwards (page 0: padding)
    tables = torch.zeros(copies, batch, shape.table_pages, dtype=torch.int32)
    tables[:, :, :pages_each] = 1 + torch.arange(copies * batch * pages_each,
                                                 dtype=torch.int32).view(copies, batch, -1)
    tables = tables.to(device)
    q = torch.randn(batch, shape.heads, shape.head_dim, **dev).to(dtype)
    k, v = (torch.randn(batch, shape.kv_heads, shape.head_dim, **dev).to(dtype) for _ in range(2))
    cos = torch.ones(shape.context + 1, shape.head_dim, device=device)
    sin = torch.zeros(shape.context + 1, shape.head_dim, device=device)
    # the new token at position `context`, stored in its page's slot, attended to with the rest
    positions = torch.full((batch,), shape.context, dtype=torch.int64, device=device)
    slots = tables[:, :, pages_each - 1].long() * shape.page + shape.context % shape.page
    lens = torch.full((batch,), shape.context + 1, dtype=torch.int32, device=device)

    def call(splits, c=0):
        return rope_store_decode_triton(q, k, v, cos, sin, positions, k_cache, v_cache,
                                        slots[c], tables[c], lens, shape.head_dim ** -0.5,
                                        num_splits=splits)
    reference, default_us = None, None
    for splits in counts:
        row = row_of(splits, calls=calls)
        if sweep.late():
            writer.add({**row, "status": "not run: time"})
            continue
        out = call(splits).float()
        if reference is not None and not torch.allclose(out, reference, atol=3e-2, rtol=3e-2):
            writer.add({**row, "status": "wrong: differs from the default"})
            continue
        reference = out if reference is None else reference
        t = sweep.timed(lambda: [call(splits, i % copies) for i in range(calls)])
        figures = sweep.figures(t, calls, nbytes)
        default_us = default_us or figures["us"]
        writer.add({**row, **figures, "vs_default": default_us / figures["us"]})


def run(out: Path, quick: bool = False, seconds: float = 60.0) -> list[dict]:
    """Every row (see the module docstring) into OUT, none started after `seconds`; returns the
    rows. Off CUDA (under TRITON_INTERPRET=1 only) the tiny shape, one call a timing."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("tune_decode: the Triton kernels need a CUDA device (or "
                         "TRITON_INTERPRET=1)")
    gpu = device.type == "cuda"
    shape = QWEN_05B if gpu and not quick else QUICK
    limits = devices.device_limits(device)
    sweep = Sweep(device, torch.bfloat16, REPS if gpu else 1, 0.2 if gpu else 0.0,
                  time.perf_counter() + seconds, limits.bytes_per_s, quick or not gpu)
    meta = {**harness.run_metadata(device), "shape": dataclasses.asdict(shape), "reps": sweep.reps,
            "limit": f"{limits.label}, {limits.bytes_per_s / 1e9:.0f} GB/s"}
    writer = Writer(Path(out), meta)
    with torch.inference_mode():
        for rows in shape.rows:
            gemv_rows(shape, rows, sweep, writer)
            decode_rows(shape, rows, sweep, writer)
    return writer.rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="the tiny shape (CPU smoke test)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="rows not started by then say `not run: time`")
    args = parser.parse_args(argv)
    run(Path(args.out), args.quick, args.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
