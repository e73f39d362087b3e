"""Benchmark every fused op against its baselines, side by side in one run.

For each op and shape: our Triton kernel ("fusedrl"), our CUDA kernel ("cuda", where the extension
kernels._C is built and the device is a GPU), eager PyTorch (the reference composition), torch.compile
of that composition, Liger-Kernel's matching op where one exists and is installed, and for GAE the
Python reversed-time loop TRL/OpenRLHF use. Reported: median time, achieved GB/s of the bytes an
ideal kernel must move and that as a fraction of the device-to-device copy bandwidth measured in
the same run, for the compute-bound linear_token_logprobs the three-GEMM floor at the bf16 matmul
rate measured in the same run and the fraction of it reached, peak extra memory (GPU), speed-up over eager, and for the small RL ops the host
microseconds per call (calls issued back to back, harness.host_us) and the kernels launched and host
syncs per call (counted as in bench/launch_count.py: Triton launches, aten kernels, a custom op as one;
torch.compile's own kernels are not seen, so its rows have none). The decoder's ops (RMSNorm with the residual add, RoPE, SiLU(gate) * up) run at 16384 rows of the
Qwen2.5-0.5B shape. The RL ops run at 256 x 2048 and
1024 x 4096 (host-bound) and 8192 x 2048 (bandwidth-bound). Printed as a table, saved as JSON.

    python bench/bench_kernels.py                 # headline GPU shapes (e.g. 16384 x 151936 bf16)
    python bench/bench_kernels.py --quick         # small shapes: proves it runs (CPU/interpreter)
    python bench/bench_kernels.py --ops kl_penalty,gae,masked_whiten,ppo_policy_loss,ppo_value_loss

On CPU the Triton column runs in the interpreter (TRITON_INTERPRET=1): its timings say nothing
about GPU speed and are labelled so.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fusedrl.bench import harness

if __name__ == "__main__" and not torch.cuda.is_available():
    # The script on the CPU runs our Triton kernels in the interpreter (`fusedrl bench` runs the
    # PyTorch backend there unless asked). Triton reads this at `import fusedrl.kernels`.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedrl.kernels as kernels
from fusedrl.kernels import cuda_ext, reference, use_backend
from fusedrl.bench.launch_count import LaunchCounter

Thunk = Callable[[], object]


@dataclass
class Case:
    """One op at one shape: how to build its inputs and each implementation's timed call."""
    op: str
    mode: str                      # "fwd" or "fwd+bwd"
    shape: str
    bytes_moved: Optional[int]     # what an ideal kernel reads + writes (None: compute-bound)
    make_inputs: Callable[[torch.device], dict]
    impls: dict[str, Callable[[dict], Thunk]] = field(default_factory=dict)
    report_host: bool = False      # report host microseconds and launches per call
    floor_flops: Optional[int] = None  # compute-bound: the matmul FLOPs no implementation avoids


def ours_backend() -> str:
    """Where the "fusedrl" rows run: Triton on a GPU; on the CPU the PyTorch backend the engine
    runs there (what `fusedrl bench` asks for), Triton's interpreter only where it is on and the
    backend left to "auto" (the script, or `fusedrl bench ... interpret=true`)."""
    if torch.cuda.is_available():
        return "triton"
    asked = kernels.requested_backend()
    return "triton" if asked == "auto" and kernels.triton_interpreting() else asked


def fused(fn: Callable, backend: str | None = None) -> Callable:
    """Run fn on one of our backends (None: ours_backend(), decided at the call)."""
    def call(*args, **kwargs):
        with use_backend(backend or ours_backend()):
            return fn(*args, **kwargs)
    return call


def ours(wrap: Callable[[Callable], Callable[[dict], Thunk]], fn: Callable) -> dict:
    """Our implementations of fn, wrapped into timed thunks: the Triton kernel, and the CUDA one
    where it can run (a GPU and the built extension)."""
    impls = {"fusedrl": wrap(fused(fn))}
    if torch.cuda.is_available() and cuda_ext.is_available():
        impls["cuda"] = wrap(fused(fn, "cuda"))
    return impls


def forward_backward(fn: Callable, grad_names: tuple[str, ...]) -> Callable[[dict], Thunk]:
    """A thunk running fn(**inputs) and backward through the named inputs with fresh grads."""
    def build(inputs: dict) -> Thunk:
        leaves = {k: (v.detach().requires_grad_() if k in grad_names else v) for k, v in inputs.items()}
        seeds = {}  # the upstream gradient, made once (on the warm-up call): not part of the op's cost

        def step():
            for name in grad_names:
                leaves[name].grad = None
            out = fn(**leaves)
            out = out[0] if isinstance(out, tuple) else out
            if "seed" not in seeds:
                seeds["seed"] = torch.ones_like(out)
            out.backward(seeds["seed"])
        return step
    return build


def forward_only(fn: Callable) -> Callable[[dict], Thunk]:
    def build(inputs: dict) -> Thunk:
        def step():
            with torch.no_grad():
                fn(**inputs)
        return step
    return build


def compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def liger_functional():
    try:
        from liger_kernel.transformers import functional
        return functional
    except ImportError:
        return None


# --- the ops -----------------------------------------------------------------------------------

def logits_inputs(n_rows: int, vocab: int, dtype: torch.dtype) -> Callable[[torch.device], dict]:
    """make_inputs of the ops on logits: logits [N, V] (normal, scale 2) and labels [N]."""
    def make(device):
        return {"logits": torch.randn(n_rows, vocab, device=device, dtype=dtype) * 2,
                "labels": torch.randint(0, vocab, (n_rows,), device=device)}
    return make


def token_logprobs_cases(n_rows: int, vocab: int, dtype: torch.dtype) -> list[Case]:
    make = logits_inputs(n_rows, vocab, dtype)
    element = torch.finfo(dtype).bits // 8
    shape = f"{n_rows}x{vocab} {str(dtype).removeprefix('torch.')}"
    eager, comp = reference.token_logprobs, compiled(reference.token_logprobs)
    liger = liger_functional()
    cases = []
    for mode, wrap, passes in (("fwd", forward_only, 1), ("fwd+bwd", lambda f: forward_backward(f, ("logits",)), 3)):
        impls = {**ours(wrap, kernels.token_logprobs), "eager": wrap(eager), "torch.compile": wrap(comp)}
        if liger is not None and torch.cuda.is_available():
            # Liger's cross entropy with reduction="none" is -logp.
            impls["liger"] = wrap(lambda logits, labels: -liger.liger_cross_entropy(logits, labels, reduction="none"))
        cases.append(Case("token_logprobs", mode, shape, passes * n_rows * vocab * element, make, impls))
    return cases


def trl_logprob_entropy():
    """TRL's log-prob + entropy from logits (`selective_log_softmax` then `entropy_from_logits`,
    two passes over the logits), or None where TRL is not installed."""
    try:
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax
    except ImportError:
        return None
    return lambda logits, labels: (selective_log_softmax(logits, labels),
                                   entropy_from_logits(logits))


def logprobs_entropy_cases(n_rows: int, vocab: int, dtype: torch.dtype) -> list[Case]:
    """Each token's log-prob and the row's entropy from logits [N, V], forward only: what TRL's
    GRPO, RLOO and DPO trainers compute 2-4 times a step (TRL's published figure is for 8,192
    tokens of a 151,936 vocabulary, bf16). Ideal bytes: one read of the logits."""
    make = logits_inputs(n_rows, vocab, dtype)

    def both(fn):
        return lambda logits, labels: fn(logits, labels, return_entropy=True)

    shape = f"{n_rows}x{vocab} {str(dtype).removeprefix('torch.')}"
    eager = both(reference.token_logprobs)
    impls = {**ours(forward_only, both(kernels.token_logprobs)), "eager": forward_only(eager),
             "torch.compile": forward_only(compiled(eager))}
    trl = trl_logprob_entropy()
    if trl is not None:
        impls["trl"] = forward_only(trl)
    element = torch.finfo(dtype).bits // 8
    return [Case("token_logprobs+entropy", "fwd", shape, n_rows * vocab * element, make, impls)]


def linear_token_logprobs_cases(n_rows: int, hidden: int, vocab: int, dtype: torch.dtype) -> list[Case]:
    def make(device):
        return {"hidden": torch.randn(n_rows, hidden, device=device, dtype=dtype),
                "weight": torch.randn(vocab, hidden, device=device, dtype=dtype) / hidden**0.5,
                "labels": torch.randint(0, vocab, (n_rows,), device=device)}

    def unfused(hidden, weight, labels):
        with use_backend(ours_backend()):
            return kernels.token_logprobs(hidden @ weight.t(), labels)

    def through_cublas(hidden, weight, labels):
        return kernels.linear_token_logprobs(hidden, weight, labels, fuse_matmul=False)

    # "fusedrl" is the default (16-bit: the fused Triton GEMMs); "fusedrl cuBLAS" the same op with
    # cuBLAS's GEMMs and the row kernels, side by side to set that default by measurement.
    ours_ways = {"fusedrl": fused(kernels.linear_token_logprobs), "fusedrl cuBLAS": fused(through_cublas)}
    grads = ("hidden", "weight")
    impls = {**{name: forward_backward(fn, grads) for name, fn in ours_ways.items()},
             "matmul+token_logprobs": forward_backward(unfused, grads),
             "eager": forward_backward(reference.linear_token_logprobs, grads),
             "torch.compile": forward_backward(compiled(reference.linear_token_logprobs), grads)}
    liger = liger_functional()
    if liger is not None and torch.cuda.is_available():
        impls["liger"] = forward_backward(
            lambda hidden, weight, labels: -liger.liger_fused_linear_cross_entropy(
                hidden, weight, labels, reduction="none"), grads)
    shape = f"N={n_rows} H={hidden} V={vocab} {str(dtype).removeprefix('torch.')}"
    # Forward alone (scoring: the reference and old log-probs) against one GEMM at the matmul peak.
    forward_impls = {**{name: forward_only(fn) for name, fn in ours_ways.items()},
                     "matmul+token_logprobs": forward_only(unfused),
                     "eager": forward_only(reference.linear_token_logprobs),
                     "torch.compile": forward_only(compiled(reference.linear_token_logprobs))}
    # The floor: three [N, H] x [H, V]-sized GEMMs (logits, d hidden, d weight) at the matmul peak
    # measured in the same run; holding no [N, V] logits costs a fourth (the recompute).
    return [Case("linear_token_logprobs", "fwd", shape, None, make, forward_impls,
                 floor_flops=2 * n_rows * hidden * vocab),
            Case("linear_token_logprobs", "fwd+bwd", shape, None, make, impls,
                 floor_flops=3 * 2 * n_rows * hidden * vocab)]


def rl_inputs(batch: int, steps: int, names: tuple[str, ...]) -> Callable[[torch.device], dict]:
    def make(device):
        inputs = {name: torch.randn(batch, steps, device=device) for name in names}
        inputs["mask"] = torch.rand(batch, steps, device=device) < 0.9
        return inputs
    return make


def trl_gae_loop(rewards, values, mask, gamma=1.0, lam=0.95):
    """GAE as TRL / OpenRLHF compute it: a Python loop over time steps (the mask multiplies in)."""
    last, reversed_adv = 0.0, []
    steps = rewards.shape[-1]
    rewards, values = rewards * mask, values * mask
    for t in reversed(range(steps)):
        next_values = values[:, t + 1] if t < steps - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_adv.append(last)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, advantages + values


def rl_cases(batch: int, steps: int) -> list[Case]:
    shape, n = f"{batch}x{steps} fp32", batch * steps
    kl = lambda fn: lambda logp, ref_logp, mask: fn(logp, ref_logp, estimator="k3", mask=mask)  # noqa: E731
    policy = lambda fn: lambda logp, old_logp, advantages, mask: fn(logp, old_logp, advantages, mask)  # noqa: E731
    value = lambda fn: lambda values, old_values, returns, mask: fn(values, old_values, returns, mask)  # noqa: E731

    def trio(make_fn, public, ref, grads):
        wrap = forward_only if not grads else lambda fn: forward_backward(fn, grads)
        return {**ours(wrap, make_fn(public)), "eager": wrap(make_fn(ref)),
                "torch.compile": wrap(compiled(make_fn(ref)))}

    def rl_case(op, mode, bytes_per_token, names, impls):
        return Case(op, mode, shape, n * bytes_per_token, rl_inputs(batch, steps, names), impls, report_host=True)

    return [
        # fwd: 2 fp32 in + mask + fp32 out; bwd: grad + 2 in + mask + grad out.
        rl_case("kl_penalty", "fwd", 13, ("logp", "ref_logp"),
                trio(kl, kernels.kl_penalty, reference.kl_penalty, ())),
        rl_case("kl_penalty", "fwd+bwd", 30, ("logp", "ref_logp"),
                trio(kl, kernels.kl_penalty, reference.kl_penalty, ("logp",))),
        rl_case("gae", "fwd", 17, ("rewards", "values"), {
            **ours(forward_only, kernels.gae),
            "eager": forward_only(reference.gae),
            "python loop (TRL)": forward_only(trl_gae_loop),
        }),
        # x and the mask read twice (the statistics need every entry before any output), fp32 out.
        rl_case("masked_whiten", "fwd", 14, ("x",), trio(lambda fn: fn, kernels.masked_whiten,
                                                          reference.masked_whiten, ())),
        # fwd: 3 in + mask + per-token grad out; bwd: read it, write the input's grad.
        rl_case("ppo_policy_loss", "fwd+bwd", 25, ("logp", "old_logp", "advantages"),
                trio(policy, kernels.ppo_policy_loss, reference.ppo_policy_loss, ("logp",))),
        rl_case("ppo_value_loss", "fwd+bwd", 25, ("values", "old_values", "returns"),
                trio(value, kernels.ppo_value_loss, reference.ppo_value_loss, ("values",))),
    ]


def model_op_cases(n_rows: int, hidden: int, heads: tuple[int, int], head_dim: int,
                   dtype: torch.dtype) -> list[Case]:
    """The decoder's fused ops: RMSNorm with the residual add, RoPE on q and k, SwiGLU's SiLU(gate)
    * up; forward (decode, scoring) and forward + backward (training)."""
    element, q_heads, kv_heads = torch.finfo(dtype).bits // 8, *heads
    name = str(dtype).removeprefix("torch.")

    def norm_inputs(device):
        return {"x": torch.randn(n_rows, hidden, device=device, dtype=dtype),
                "residual": torch.randn(n_rows, hidden, device=device, dtype=dtype),
                "weight": torch.rand(hidden, device=device, dtype=dtype) + 0.5}

    def rope_inputs(device):
        angles = torch.rand(n_rows, head_dim, device=device) * 6.28
        return {"q": torch.randn(n_rows, q_heads, head_dim, device=device, dtype=dtype),
                "k": torch.randn(n_rows, kv_heads, head_dim, device=device, dtype=dtype),
                "cos": angles.cos().to(dtype), "sin": angles.sin().to(dtype)}

    def swiglu_inputs(device):
        return {"gate_up": torch.randn(n_rows, 2 * hidden, device=device, dtype=dtype)}

    norm = lambda fn: lambda x, residual, weight: fn(x, weight, 1e-6, residual)  # noqa: E731
    ops = (  # (op, inputs, wrap, ours, reference, grads, bytes of the forward per row)
        ("rms_norm", norm_inputs, norm, kernels.rms_norm, reference.rms_norm, ("x", "residual"),
         4 * hidden * element),  # x, residual in; y, x + residual out
        ("rope", rope_inputs, lambda fn: fn, kernels.rope, reference.rope, ("q", "k"),
         2 * (q_heads + kv_heads) * head_dim * element + 2 * head_dim * element),
        ("silu_mul", swiglu_inputs, lambda fn: fn, kernels.silu_mul, reference.silu_mul,
         ("gate_up",), 3 * hidden * element))
    cases = []
    for op, make, wrap, public, ref, grads, row_bytes in ops:
        shape = f"{n_rows}x{hidden} {name}" if op != "rope" else \
            f"{n_rows}x({q_heads}+{kv_heads})x{head_dim} {name}"
        for mode, build, passes in (("fwd", forward_only, 1),
                                    ("fwd+bwd", lambda f, g=grads: forward_backward(f, g), 3)):
            impls = {**ours(build, wrap(public)), "eager": build(wrap(ref)),
                     "torch.compile": build(compiled(wrap(ref)))}
            # With host figures: on an H100 our forward + backward of these ops took several
            # times their bytes' time (0.65-0.84 ms at 16,384 rows; eager's SiLU * up 0.29 ms);
            # the host microseconds per call say whether that is launches and dispatch.
            cases.append(Case(op, mode, shape, passes * n_rows * row_bytes, make, impls,
                              report_host=True))
    return cases


def all_cases(quick: bool) -> list[Case]:
    if quick:
        return (token_logprobs_cases(64, 1000, torch.float32)
                + linear_token_logprobs_cases(64, 32, 1000, torch.float32)
                + rl_cases(8, 128))
    return (token_logprobs_cases(16384, 151936, torch.bfloat16)
            + model_op_cases(16384, 896, (14, 2), 64, torch.bfloat16)
            + token_logprobs_cases(4096, 32000, torch.bfloat16)
            + linear_token_logprobs_cases(4096, 896, 151936, torch.bfloat16)
            + linear_token_logprobs_cases(16384, 896, 151936, torch.bfloat16)
            + rl_cases(256, 2048) + rl_cases(1024, 4096) + rl_cases(8192, 2048))


HOST_US_SECONDS = 1.0


def launches_per_call(thunk: Thunk) -> tuple[int, int]:
    """(kernels launched, host syncs) by one call (after the timing's warm-up)."""
    with LaunchCounter() as counter:
        thunk()
    return counter.launches, sum(counter.syncs.values())


def measure(case: Case, device: torch.device, copy_gbps: float, matmul_tflops: float, skip: set[str],
            budget_s: float, min_reps: int = 3, host_calls: int | None = None) -> list[dict]:
    """Each implementation of `case` not in `skip`: its rows (time, bandwidth or floor, peak memory,
    host microseconds over `host_calls` calls (default 50 on a GPU, 5 on the CPU; fewer where they
    would take over HOST_US_SECONDS) and launches)."""
    inputs = case.make_inputs(device)
    rows = []
    for name, build in case.impls.items():
        row = {"op": case.op, "mode": case.mode, "shape": case.shape, "impl": name}
        if name in skip:
            continue
        try:
            thunk = build(inputs)
            row["ms"] = harness.time_ms(thunk, device, budget_s=budget_s, min_reps=min_reps)
            row["peak_extra_mib"] = (lambda b: None if b is None else b / 2**20)(
                harness.peak_extra_bytes(thunk, device))
            if case.report_host:
                calls = host_calls or (50 if device.type == "cuda" else 5)
                # a slow row issues calls for about HOST_US_SECONDS, not 50 of them (eager GAE's
                # 2,048-step loop is 0.3 s a call: 50 calls were 15 s of a GPU visit's headline)
                calls = max(1, min(calls, int(HOST_US_SECONDS * 1e3 / row["ms"])))
                row["host_us"] = harness.host_us(thunk, device, calls=calls)
                if name != "torch.compile":
                    row["launches"], row["host_syncs"] = launches_per_call(thunk)
        except Exception as error:  # a baseline that cannot run here is reported, not fatal
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        if case.bytes_moved and "ms" in row:
            row["gbps"] = case.bytes_moved / (row["ms"] * 1e-3) / 1e9
            row["frac_of_copy"] = row["gbps"] / copy_gbps
        if case.floor_flops and "ms" in row:
            row["floor_ms"] = case.floor_flops / (matmul_tflops * 1e12) * 1e3
            row["frac_of_floor"] = row["floor_ms"] / row["ms"]
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for baseline, key in (("eager", "speedup_vs_eager"), ("fusedrl", "speedup_vs_triton")):
        base_ms = next((r["ms"] for r in rows if r["impl"] == baseline and "ms" in r), None)
        for row in rows:
            if base_ms and "ms" in row:
                row[key] = base_ms / row["ms"]
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU / interpreter smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the results here (default: print only)")
    parser.add_argument("--ops", default=None, help="comma-separated op names to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated implementations to leave out, "
                        "e.g. torch.compile")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of repetitions per timing")
    parser.add_argument("--min-reps", type=int, default=3,
                        help="timed repetitions at least, after the warm-up (1: a smoke run's)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and not args.quick:
        parser.error("the headline shapes are for a GPU; use --quick on CPU")
    if args.min_reps < 1:
        parser.error(f"--min-reps must be >= 1, got {args.min_reps}")
    meta = harness.run_metadata(device)
    copy_gbps = harness.copy_bandwidth_gbps(device, 2**30 if device.type == "cuda" else 2**26)
    matmul_tflops = harness.matmul_tflops(device, 8192 if device.type == "cuda" else 256,
                                          torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"device: {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"commit {meta['git_commit']}  copy bandwidth {copy_gbps:.1f} GB/s  "
          f"matmul {matmul_tflops:.1f} TFLOP/s")
    if meta["triton_interpret"]:
        print("note: Triton runs in the interpreter here; fusedrl timings are not GPU timings")
    wanted = set(args.ops.split(",")) if args.ops else None
    skip = set(filter(None, args.skip.split(",")))
    rows = []
    for case in all_cases(args.quick):
        if wanted is None or case.op in wanted:
            rows += measure(case, device, copy_gbps, matmul_tflops, skip, args.budget,
                            args.min_reps)
    columns = [("op", "op"), ("mode", "mode"), ("shape", "shape"), ("impl", "impl"), ("ms", "ms"),
               ("speedup_vs_eager", "x eager"), ("speedup_vs_triton", "x triton"),
               ("gbps", "GB/s"), ("frac_of_copy", "of copy"), ("floor_ms", "floor ms"),
               ("frac_of_floor", "of floor"), ("host_us", "host us"),
               ("launches", "launches"), ("host_syncs", "syncs"),
               ("peak_extra_mib", "peak MiB"), ("error", "error")]
    print(harness.format_table(rows, columns))
    payload = {"meta": {**meta, "copy_gbps": copy_gbps, "matmul_tflops": matmul_tflops, "quick": args.quick},
               "results": rows}
    if args.json:
        harness.write_json(args.json, payload)
        print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
