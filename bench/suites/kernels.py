"""The kernels suite: every fused op of bench_kernels.py (ours, eager PyTorch, torch.compile,
Liger where it runs), the GRPO loss from hidden states of bench_integrations.py (ours, plain
PyTorch, Liger's, TRL 1.x's fused head) and the distillation divergence of bench_distill.py (ours,
plain PyTorch, TRL 1.x's chunked divergence, Liger's JSD), as rows of the schema. The last two's
variants: on a GPU in this process one after another (each one's peak the allocator's above what
was held, the memory freed between them, a time-budgeted loop as the other rows'), on the CPU each
in its own process (the resident set's peak is a process's); a peer not installed is not imported.

A memory-bound op's fraction_of_limit is its bytes moved (what an ideal kernel reads and writes)
per second over the device's bandwidth; a compute-bound one's (the fused LM head, the GRPO loss)
its unavoidable GEMM FLOPs per second over the device's FLOP/s. The distillation divergence's rows
are compute-bound too: the student's forward and backward GEMMs and the teacher's forward.
"""
from __future__ import annotations

import functools
import os
from typing import Iterable, Iterator

import torch

from .. import (bench_attention, bench_distill, bench_integrations, bench_kernels,
               bench_sampler, harness, results, shapes)
from ..cases import Case
from ..context import Context, peer_version

SUITE = "kernels"
# Ops that a peer implements: the peer's row says why it did not run where it did not.
LIGER_OPS = ("token_logprobs", "linear_token_logprobs")


def kernel_cases(quick: bool) -> list:
    """Every bench_kernels case (quick: small shapes, a CPU's minutes). The two losses from hidden
    states are grpo_loss_rows' and distill_rows'."""
    if not quick:
        return bench_kernels.all_cases(False)
    return (bench_kernels.token_logprobs_cases(64, 4096, torch.float32)
            + bench_kernels.linear_token_logprobs_cases(64, 64, 4096, torch.float32)
            + bench_kernels.model_op_cases(64, 64, (4, 2), 16, torch.float32)
            + bench_kernels.rl_cases(*shapes.RL_OPS))


def _impl_name(impl: str) -> str:
    if impl == "cuda":
        return "fusedrl cuda"
    if impl == "liger":
        return f"liger {peer_version('liger-kernel')}"
    if impl == "trl":
        return f"trl {peer_version('trl')}"
    return impl


def case_name(case) -> str:
    return f"{case.op} {case.mode} {case.shape}"


def case_limit(ctx: Context, case) -> str:
    return ctx.flops_limit if case.floor_flops else ctx.bandwidth_limit


def case_rows(ctx: Context, case, measured: list[dict]) -> list[dict]:
    """bench_kernels' rows of one case in the schema."""
    name = case_name(case)
    out = []
    for r in measured:
        figures = {k: r.get(k) for k in ("gbps", "peak_extra_mib", "host_us", "launches",
                                          "host_syncs") if r.get(k) is not None}
        fraction, limit = None, case_limit(ctx, case)
        if "ms" in r:
            figures["seconds"] = r["ms"] / 1e3
            if case.bytes_moved:
                figures["bytes_moved"] = case.bytes_moved
                fraction = ctx.bandwidth_fraction(case.bytes_moved / figures["seconds"])
            elif case.floor_flops:
                figures["flops"] = case.floor_flops
                fraction = ctx.flops_fraction(case.floor_flops / figures["seconds"])
        status = r.get("error", "ok")
        out.append(results.make_row(SUITE, name, _impl_name(r["impl"]), fraction_of_limit=fraction,
                                    limit=limit, status=status, **figures))
    if case.op in LIGER_OPS and "liger" not in case.impls:
        why = ("not installed" if peer_version("liger-kernel") is None
               else "not run: Liger's kernels need CUDA")
        out.append(results.missing_row(SUITE, name, "liger", why, case_limit(ctx, case)))
    return out


def peer_rows(ctx: Context, name: str, variants: dict, measured: Iterable[dict], flops: int,
              keys: tuple, trl_needs: str) -> Iterator[dict]:
    """The rows of a loss measured per variant (bench_integrations', bench_distill's rows:
    variant, seconds, peak_extra_mib, the figures `keys`, or error), each as it comes: each peer
    named with its version, "not installed" where it is not. trl_needs: what an older TRL lacks,
    the status of its row."""
    for r in measured:
        impl, dist = variants[r["variant"]]
        version = peer_version(dist) if dist else None
        if dist and version is None:
            yield results.missing_row(SUITE, name, impl, "not installed", ctx.flops_limit)
            continue
        impl = f"{impl} {version}" if version else impl
        if "error" in r:
            status = r["error"]
            if dist == "trl" and ("ModuleNotFoundError" in status or "ImportError" in status):
                status = f"not installed (TRL 1.x; trl {version} has no {trl_needs})"
            yield results.missing_row(SUITE, name, impl, status, ctx.flops_limit)
            continue
        yield results.make_row(
            SUITE, name, impl, fraction_of_limit=ctx.flops_fraction(flops / r["seconds"]),
            limit=ctx.flops_limit, seconds=r["seconds"], flops=flops,
            peak_extra_mib=r["peak_extra_mib"], **{k: r.get(k) for k in keys})


def installed(variants: dict) -> dict:
    """variant -> whether it runs here: its peer's distribution installed (ours always)."""
    return {variant: dist is None or peer_version(dist) is not None
            for variant, (_, dist) in variants.items()}


def variants_here(ctx: Context, here: bool | None) -> bool:
    """Whether a loss's variants run in this process (here=None: on a GPU, where the allocator
    gives each its own peak; the CPU's resident set needs a process each)."""
    return ctx.device.type == "cuda" if here is None else here


# The GRPO loss's peers (bench_integrations' variants) and their rows' names and distributions.
LOSS_VARIANTS = {"torch": ("eager", None), "fusedrl": ("fusedrl", None),
                 "fusedrl_recompute": ("fusedrl recompute", None),
                 "liger": ("liger", "liger-kernel"), "trl_head": ("trl fused head", "trl")}


def grpo_loss_name(n: int, h: int, v: int) -> str:
    return f"grpo_loss fwd+bwd N={n} H={h} V={v}"


def grpo_loss_rows(ctx: Context, shape: tuple[int, int, int] | None = None,
                   here: bool | None = None) -> Iterator[dict]:
    """The GRPO loss from hidden states, every variant (variants_here: in this process or each in
    its own); shape: N, H, V (default: the suite's)."""
    n, h, v = shape or ((32, 16, 128) if ctx.quick else (4096, 896, 151936))
    name = grpo_loss_name(n, h, v)
    flops = 3 * 2 * n * h * v  # logits, d hidden, d weight: the GEMMs no implementation avoids
    if variants_here(ctx, here):
        measured = bench_integrations.measure_here(n, h, v, installed(LOSS_VARIANTS), ctx.device,
                                                   loop_budget(ctx))
    else:
        args = type("Args", (), {"variants": list(LOSS_VARIANTS), "device": ctx.device.type,
                                 "trl_dir": os.environ.get("PYTHONPATH", "")})()
        measured = bench_integrations.bench_shape(n, h, v, args)
    yield from peer_rows(ctx, name, LOSS_VARIANTS, measured, flops,
                         ("loss_error", "grad_weight_rel_error"), "trl.kernels")


def loop_budget(ctx: Context) -> float:
    """Seconds of timed calls per row (the kernel rows' own)."""
    return 0.05 if ctx.quick else 1.0


# The distillation divergence's peers (bench_distill's variants): their rows' names, distributions.
DISTILL_VARIANTS = {"torch": ("eager", None), "fusedrl": ("fusedrl", None),
                    "trl": ("trl chunked divergence", "trl"),
                    "liger": ("liger jsd", "liger-kernel")}


def distill_shape(quick: bool) -> tuple[int, int, int]:
    """N, H, V: the student's rows, width and vocabulary (the teacher is twice as wide); quick:
    [N, V] logits of 32 MiB in fp32 (the teacher's too), enough to set the fused path's memory
    apart."""
    return shapes.DISTILL_QUICK if quick else (4096, 896, 151936)


def distill_name(n: int, h: int, v: int, device: torch.device) -> str:
    return (f"distill_divergence fwd+bwd N={n} H={h} V={v} teacher H={2 * h} "
            f"beta={bench_distill.BETA} {str(bench_distill.input_dtype(device))[6:]}")


def distill_rows(ctx: Context, shape: tuple[int, int, int] | None = None,
                 here: bool | None = None) -> Iterator[dict]:
    """The distillation divergence from two LM heads (beta 0.5, the JSD, temperature 0.7),
    forward + backward, every variant (variants_here: in this process or each in its own); a
    peer not installed is not imported. shape: N, H, V (default: distill_shape's)."""
    n, h, v = shape or distill_shape(ctx.quick)
    name = distill_name(n, h, v, ctx.device)
    # the student's logits, d hidden and d weight, the teacher's logits: the GEMMs none avoids
    flops = 2 * n * v * (3 * h + 2 * h)
    runs = installed(DISTILL_VARIANTS)
    if variants_here(ctx, here):
        measured = bench_distill.measure_here(n, h, v, runs, ctx.device, loop_budget(ctx))
    else:
        args = type("Args", (), {"device": ctx.device.type, "chunk_size": None,
                                 "trl_dir": os.environ.get("PYTHONPATH", "")})()
        measured = (bench_distill.run_in_process(variant, n, h, v, args) if runs[variant]
                    else {"variant": variant} for variant in DISTILL_VARIANTS)
    yield from peer_rows(ctx, name, DISTILL_VARIANTS, measured, flops, ("loss",),
                         "_chunked_divergence_loss")


ATTENTION = "attention (packed train fwd+bwd; paged prefill over shared prefix pages)"


def attention_rows(ctx: Context, budget: float):
    """bench_attention's two cases (a packed batch's forward + backward, a paged prefill over
    shared prefix pages): the engine's path, the padded groups and the per-sequence SDPA loop.
    Compute-bound: fraction_of_limit is the causal attention's FLOPs per second over FLOP/s."""
    for r in bench_attention.measure(ctx.quick, ctx.device, budget):
        seconds = r["ms"] / 1e3
        impl = "fusedrl" if r["impl"] == "engine" else r["impl"]
        yield results.make_row(
            SUITE, f"attention {r['case']}", impl,
            fraction_of_limit=ctx.flops_fraction(r["flops"] / seconds), limit=ctx.flops_limit,
            seconds=seconds, flops=r["flops"], attention_ops=r["attention_ops"],
            speedup_over_loop=r["speedup"], peak_extra_mib=r.get("peak_extra_mib"))


def sampler_name(batch: int, vocab: int) -> str:
    return f"sampler B={batch} V={vocab}"


# The sampler's rows: ours as called from Python (its launches and dispatch on the host each
# call), ours replayed from a CUDA graph (as the engine's decode step runs it), the eager reference.
SAMPLER_IMPLS = ("fusedrl", "fusedrl CUDA graph", "eager")


def sampler_rows(ctx: Context, batch: int, vocab: int, budget: float, suite: str = SUITE):
    """bench_sampler's decode step at one batch, every mode: ours (sample) called, ours replayed
    from a CUDA graph, and the eager reference (reference.sample, the same draws). Memory-bound:
    fraction_of_limit is one read of the logits per second over the bandwidth."""
    from fusedrl.kernels import reference
    timer_us = lambda fn: 1e3 * harness.time_ms(fn, ctx.device, budget_s=budget)  # noqa: E731
    read_bytes = batch * vocab * ctx.dtype.itemsize
    graphs = ctx.device.type == "cuda"
    for impl, sampler, graph in zip(SAMPLER_IMPLS, (bench_sampler.sample, bench_sampler.sample,
                                                    reference.sample), (False, True, False)):
        if graph and not graphs:
            for mode in bench_sampler.MODES:
                yield results.missing_row(suite, f"sampler {mode} B={batch} V={vocab}", impl,
                                          results.NO_CUDA_GRAPHS, ctx.bandwidth_limit)
            continue
        r = bench_sampler.measure(batch, vocab, ctx.device, timer_us, ctx.dtype, sampler, graph)
        for mode in bench_sampler.MODES:
            seconds = r[f"{mode}_us"] / 1e6
            yield results.make_row(
                suite, f"sampler {mode} B={batch} V={vocab}", impl,
                fraction_of_limit=ctx.bandwidth_fraction(read_bytes / seconds),
                limit=ctx.bandwidth_limit, seconds=seconds, bytes_moved=read_bytes,
                one_read_seconds=r["one_read_us"] / 1e6)


def case_impls(case) -> tuple[str, ...]:
    impls = tuple(_impl_name(i) for i in case.impls)
    return impls + (("liger",) if case.op in LIGER_OPS and "liger" not in case.impls else ())


def kernel_case(ctx: Context, case, budget: float, reps: int, host_calls) -> Case:
    """One bench_kernels case as a Case of this suite (torch.compile left out on the CPU under
    --quick: its compile outlasts the quick suite)."""
    skip = {"torch.compile"} if ctx.quick and ctx.device.type == "cpu" else set()
    # On the CPU "fusedrl cuBLAS" is "fusedrl" (the PyTorch backend has one GEMM either way).
    same = {"fusedrl cuBLAS"} if ctx.device.type == "cpu" and not ctx.interpreted else set()

    def measure():
        limits = ctx.limits
        measured = bench_kernels.measure(case, ctx.device, limits.bytes_per_s / 1e9,
                                         limits.flops_per_s / 1e12, skip | same, budget, reps,
                                         host_calls)
        yield from case_rows(ctx, case, measured)
        for impl in skip & set(case.impls):
            yield results.missing_row(SUITE, case_name(case), impl, "not run: --quick on the "
                                      "CPU (compiling takes longer than the quick suite)",
                                      case_limit(ctx, case))
    impls = tuple(i for i in case_impls(case) if i not in same)
    return Case(SUITE, case_name(case), impls, measure)


def cases(ctx: Context) -> list[Case]:
    """Every case of the suite, in order."""
    budget, reps, host_calls = (0.05, 3, 2) if ctx.quick else (1.0, 3, None)
    out = [kernel_case(ctx, case, budget, reps, host_calls) for case in kernel_cases(ctx.quick)]
    batches, vocab = ((1, 4), 2048) if ctx.quick else (bench_sampler.BATCHES, bench_sampler.VOCAB)
    out += [Case(SUITE, sampler_name(batch, vocab), SAMPLER_IMPLS,
                 functools.partial(sampler_rows, ctx, batch, vocab, budget), model_paths=True)
            for batch in batches]
    out.append(Case(SUITE, ATTENTION, ("fusedrl", "padded", "loop"),
                    functools.partial(attention_rows, ctx, budget), model_paths=True))
    n, h, v = (32, 16, 128) if ctx.quick else (4096, 896, 151936)
    out.append(Case(SUITE, grpo_loss_name(n, h, v),
                    ("eager", "fusedrl", "fusedrl recompute", "liger", "trl"),
                    functools.partial(grpo_loss_rows, ctx)))
    out.append(Case(SUITE, distill_name(*distill_shape(ctx.quick), ctx.device),
                    ("eager", "fusedrl", "trl", "liger"), functools.partial(distill_rows, ctx)))
    return out
