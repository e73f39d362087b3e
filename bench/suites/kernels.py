"""The kernels suite: every fused op of bench_kernels.py (ours, eager PyTorch, torch.compile,
Liger where it runs) and the GRPO loss from hidden states of bench_integrations.py (ours, plain
PyTorch, Liger's, TRL 1.x's fused head, each in its own process), as rows of the schema.

A memory-bound op's fraction_of_limit is its bytes moved (what an ideal kernel reads and writes)
per second over the device's bandwidth; a compute-bound one's (the fused LM head, the GRPO loss)
its unavoidable GEMM FLOPs per second over the device's FLOP/s.
"""
from __future__ import annotations

import os

import torch

from .. import bench_integrations, bench_kernels, results
from ..context import Context, peer_version

SUITE = "kernels"
# Ops that a peer implements: the peer's row says why it did not run where it did not.
LIGER_OPS = ("token_logprobs", "linear_token_logprobs")


def kernel_cases(quick: bool) -> list:
    """Every bench_kernels case (quick: shapes small enough for the Triton interpreter on a CPU).
    The distillation divergence's cases (bench_distill.py) join this list as one more family."""
    if not quick:
        return bench_kernels.all_cases(False)
    return (bench_kernels.token_logprobs_cases(16, 256, torch.float32)
            + bench_kernels.linear_token_logprobs_cases(16, 32, 256, torch.float32)
            + bench_kernels.model_op_cases(16, 64, (4, 2), 16, torch.float32)
            + bench_kernels.rl_cases(4, 64))


def _impl_name(impl: str) -> str:
    if impl == "cuda":
        return "fusedrl cuda"
    if impl == "liger":
        return f"liger {peer_version('liger-kernel')}"
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
        figures = {k: r.get(k) for k in ("ms", "gbps", "peak_extra_mib", "host_us", "launches",
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


# The GRPO loss's peers (bench_integrations' variants) and their rows' names and distributions.
LOSS_VARIANTS = {"torch": ("eager", None), "fusedrl": ("fusedrl", None),
                 "liger": ("liger", "liger-kernel"), "trl_head": ("trl fused head", "trl")}


def grpo_loss_rows(ctx: Context) -> list[dict]:
    """The GRPO loss from hidden states, each variant in its own process (peak memory its own)."""
    n, h, v = (32, 16, 128) if ctx.quick else (4096, 896, 151936)
    args = type("Args", (), {"variants": list(LOSS_VARIANTS), "device": ctx.device.type,
                             "trl_dir": os.environ.get("PYTHONPATH", "")})()
    name = f"grpo_loss fwd+bwd N={n} H={h} V={v}"
    flops = 3 * 2 * n * h * v  # logits, d hidden, d weight: the GEMMs no implementation avoids
    out = []
    for r in bench_integrations.bench_shape(n, h, v, args):
        impl, dist = LOSS_VARIANTS[r["variant"]]
        version = peer_version(dist) if dist else None
        if dist and version is None:
            out.append(results.missing_row(SUITE, name, impl, "not installed", ctx.flops_limit))
            continue
        impl = f"{impl} {version}" if version else impl
        if "error" in r:
            status = r["error"]
            if dist == "trl" and "ModuleNotFoundError" in status:
                status = f"not installed (TRL 1.x; trl {version} has no trl.kernels)"
            out.append(results.missing_row(SUITE, name, impl, status, ctx.flops_limit))
            continue
        out.append(results.make_row(
            SUITE, name, impl, fraction_of_limit=ctx.flops_fraction(flops / r["seconds"]),
            limit=ctx.flops_limit, seconds=r["seconds"], flops=flops,
            peak_extra_mib=r["peak_extra_mib"], loss_error=r.get("loss_error"),
            grad_weight_rel_error=r.get("grad_weight_rel_error")))
    return out


def rows(ctx: Context) -> list[dict]:
    budget, reps, host_calls = (0.02, 1, 2) if ctx.quick else (1.0, 3, None)
    # torch.compile's CPU compile takes longer than a quick run of the whole suite.
    skip = {"torch.compile"} if ctx.quick and ctx.device.type == "cpu" else set()
    limits = ctx.limits
    out = []
    cases = [case for case in kernel_cases(ctx.quick) if ctx.wanted(case_name(case))]
    for case in ctx.progress(cases, "kernels"):
        measured = bench_kernels.measure(case, ctx.device, limits.bytes_per_s / 1e9,
                                         limits.flops_per_s / 1e12, skip, budget, reps,
                                         host_calls)
        out += case_rows(ctx, case, measured)
        out += [results.missing_row(SUITE, case_name(case), impl, "not run: --quick on the CPU "
                                    "(compiling takes longer than the quick suite)",
                                    case_limit(ctx, case))
                for impl in skip if impl in case.impls]
    return out + (grpo_loss_rows(ctx) if ctx.wanted("grpo_loss") else [])
