"""Where a decode step and a training micro-batch spend their time, at the Qwen2.5-0.5B shape in
bf16, what no visit has measured first, each file written as soon as it is taken: on a GPU, the
decode kernels at other launch shapes (tune_decode.py: tune_decode.jsonl and .md, a row at a time,
so a deadline cuts only its last rows; the kernels that take 45% and 20% of a batch-1 step's device
time, whose launch shapes no GPU has chosen), then the micro-batch replayed from a CUDA graph
(profile_train_graph.txt: its first profile; a failed capture may leave the device in error, so
only profiles an earlier visit took come after it). Then torch.profiler summaries of the paths whose
GPU bars were missed (on an H100: decode at batch 256, 23.4k tok/s against 70k, whose paged decode
changed since; decode at batch 1, 711 tok/s against 1,800; a 1k-token micro-batch called, 194 ms
against 15 ms) and PPO's policy and value losses at 256 x 2048 fp32 (forward + backward, 1.07 and
0.90 ms against torch.compile's 0.85 and 0.51), and last the optimizer step after a micro-batch
(10.9 ms on the H200, never profiled).

For each path, a text file with its head: wall milliseconds per step, the device's busy
milliseconds (the kernels' own time summed) and their share of the wall, kernels launched and host
synchronizations per step; then the ops' table by device time and by host time (top 25 each).
A busy share far below 1 says the host is the time: its table says where.

    python bench/profile_steps.py --out DIR          # GPU: DIR/profile_*.txt, tune_decode.*
    python bench/profile_steps.py --out DIR --quick  # the tiny shape on the CPU (host times only)
"""
from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from fusedrl.bench import bench_kernels, bench_train_step, harness, shapes, tune_decode
from fusedrl.bench.timing import synchronize
from fusedrl.engine.train.fused_adamw import FusedAdamW
from fusedrl.engine.train.optim import clip_and_step
from fusedrl.engine.runs.durable import write_text_atomic
from fusedrl.kernels.attention import packed_attention_kernel

MODEL = "qwen2.5-0.5b"
DECODE_PROMPT, DECODE_TOKENS = 128, 64
WIDE_BATCH, WIDE_BATCH_QUICK = 256, 4  # the second decode profile's batch (the bar's 256)
TRAIN_TOKENS, TRAIN_SEQ = 1024, 256
RL_OP_CALLS = 20
# Host calls that wait for the device (their names in the profiler's runtime rows).
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
         "cudaMemcpy", "cudaStreamWaitEvent")
TOP = 25
# tune_decode's rows not started by then say so: its batch-256 rows (~31, each a graph of cached
# compiles timed for 0.2 s) fit, and batch 1's as far as they go (the H200 visit's 35 s took ~45 of
# them); the captured micro-batch after it needs ~30 s of what is left to the stage in call 2
# (bench/gpu.sh's plan)
TUNE_SECONDS = 35


def summary(prof, steps: int, wall_s: float, device: torch.device) -> str:
    """The profile's head (per step: wall, device busy, launches, syncs) and its two tables."""
    events = prof.key_averages()
    gpu = device.type == "cuda"
    busy_us = sum(e.self_device_time_total for e in events) if gpu else 0.0
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                          "cudaLaunchKernelExC", "cuLaunchKernelEx"))
    syncs = sum(e.count for e in events if e.key in SYNCS)
    wall_ms = wall_s * 1e3 / steps
    head = [f"steps profiled: {steps}; wall {wall_ms:.3f} ms per step"]
    if gpu:
        head.append(f"device busy {busy_us / 1e3 / steps:.3f} ms per step "
                    f"({busy_us / 1e3 / steps / wall_ms:.0%} of the wall); kernels launched "
                    f"{launches / steps:.1f} and host syncs {syncs / steps:.1f} per step")
    tables = []
    if gpu:
        tables.append("By device time:\n" + events.table(sort_by="self_device_time_total",
                                                         row_limit=TOP))
    tables.append("By host time:\n" + events.table(sort_by="self_cpu_time_total", row_limit=TOP))
    return "\n".join(head) + "\n\n" + "\n\n".join(tables) + "\n"


def profiled(fn, steps: int, device: torch.device):
    """(the profile of fn() run `steps` times after a warm-up call, the wall seconds)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                            else [])
    fn()  # compiles, graph captures, allocator pools: outside the profile
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        synchronize(device)
        wall = time.perf_counter() - start
    return prof, wall


def decode_profile(quick: bool, device: torch.device, dtype: torch.dtype, batch: int = 1) -> str:
    """Greedy decode at `batch` through the engine (CUDA-graph steps on a GPU), one call of
    DECODE_TOKENS new tokens per sequence profiled: per step, the call's wall over its steps."""
    from fusedrl.engine.inference.llm import LLM
    from fusedrl.engine.inference.sampling_params import SamplingParams

    model = shapes.model_dir(MODEL, quick, 0, dtype, device)
    try:
        llm = LLM(str(model.path), dtype=dtype, device=str(device), max_num_seqs=batch,
                  kv_cache_memory=(2 << 30) if device.type == "cuda" else 64 << 20)
        new = 8 if quick else DECODE_TOKENS
        prompts = torch.randint(0, llm.config.vocab_size, (batch, 16 if quick else DECODE_PROMPT),
                                generator=torch.Generator().manual_seed(0)).tolist()
        params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
        prof, wall = profiled(lambda: llm.generate(prompts, params), 1, device)
        return (f"decode batch {batch}, {new} new tokens (one call)\n"
                + summary(prof, new, wall, device))
    finally:
        model.remove()


def micro_batch_model(quick: bool, device: torch.device, dtype: torch.dtype):
    """The training profiles' model: Qwen2.5-0.5B's shape at 24 layers; quick: 2 tiny layers."""
    small = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_heads=4,
                 num_kv_heads=2, head_dim=16)
    return shapes.qwen_like(2 if quick else 24, dtype, str(device), **(small if quick else {}))


def train_profile(quick: bool, device: torch.device, dtype: torch.dtype,
                  captured: bool = False) -> str:
    """One micro-batch (forward, fused head, backward; no optimizer), three profiled (captured:
    three replays of it from a CUDA graph, captured in the warm-up call)."""
    model = micro_batch_model(quick, device, dtype)
    tokens = 64 if quick else TRAIN_TOKENS
    seq = 32 if quick else TRAIN_SEQ
    make = bench_train_step.captured_micro_batch if captured else bench_train_step.micro_batch
    prof, wall = profiled(make(model, tokens, seq, device), 3, device)
    how = "replayed from a CUDA graph (its bucket's filler rows included)" if captured else "called"
    return (f"training micro-batch of {tokens} tokens, {how}; packed attention "
            f"{packed_attention_kernel(device, dtype)}\n" + summary(prof, 3, wall, device))


def rl_ops_profile(quick: bool, device: torch.device, dtype: torch.dtype) -> str:
    """PPO's policy and value losses, forward + backward at the RL ops' shape (256 x 2048 fp32),
    RL_OP_CALLS calls each on the backend of their fastest row (the CUDA twins where built, else
    Triton; the CPU's PyTorch backend here): the two small ops that trailed torch.compile, both
    host-bound."""
    from fusedrl import kernels
    from fusedrl.kernels import cuda_ext
    if device.type == "cuda":
        backend = "cuda" if cuda_ext.is_available() else "triton"
    else:  # what the engine runs on the CPU, interpreter or not
        backend = "torch"
    batch, steps = (8, 64) if quick else shapes.RL_OPS
    sections = []
    for op, names, grad in (("ppo_policy_loss", ("logp", "old_logp", "advantages"), "logp"),
                            ("ppo_value_loss", ("values", "old_values", "returns"), "values")):
        inputs = bench_kernels.rl_inputs(batch, steps, names)(device)
        call = bench_kernels.forward_backward(bench_kernels.fused(getattr(kernels, op), backend),
                                              (grad,))(inputs)
        prof, wall = profiled(call, RL_OP_CALLS, device)
        sections.append(f"{op} fwd+bwd {batch}x{steps} fp32, backend {backend} "
                        f"({RL_OP_CALLS} calls)\n" + summary(prof, RL_OP_CALLS, wall, device))
    return "\n".join(sections)


def optimizer_profile(quick: bool, device: torch.device, dtype: torch.dtype) -> str:
    """The optimizer step after a micro-batch (FusedAdamW, clipped, bench_train_step's) on the
    micro-batch's model, three profiled: on the H200 10.9 ms for 0.5B parameters whose update
    reads and writes about 14 GB (about 3 ms at the datasheet bandwidth); its multi-tensor ops
    each cover the 290 parameter tensors, as the foreach zero did that the captured micro-batch's
    profile found at about 6 ms of host."""
    params = list(micro_batch_model(quick, device, dtype).parameters())
    for param in params:
        param.grad = torch.randn_like(param) * 1e-3
    optimizer = FusedAdamW(params, lr=1e-5)
    prof, wall = profiled(lambda: clip_and_step([optimizer], 1.0), 3, device)
    return (f"optimizer step (FusedAdamW, clipped) over {len(params)} parameter tensors, "
            f"{sum(p.numel() for p in params):,} parameters\n" + summary(prof, 3, wall, device))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for profile_decode.txt, profile_train.txt")
    p.add_argument("--quick", action="store_true", help="the tiny shape on the CPU")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = harness.run_metadata(device)
    stamp = f"commit {meta['git_commit']}; {meta['device']}; torch {meta['torch']}\n"
    wide = WIDE_BATCH_QUICK if args.quick else WIDE_BATCH
    gpu = device.type == "cuda"
    # First what no earlier visit measured (GPU timings only; the interpreter's decide nothing):
    # the decode kernels' launch shapes, then the micro-batch replayed from a CUDA graph (after the
    # tuning: a failed first capture could leave the device in error for what comes after it).
    if gpu:
        try:  # its rows are written as they come: an error costs only the rows after it
            tune_decode.run(out, seconds=TUNE_SECONDS)
        except Exception as error:
            print(f"tune_decode stopped: {type(error).__name__}: {error}", flush=True)
        try:
            text = stamp + train_profile(False, device, dtype, captured=True)
        except Exception as error:
            text = stamp + f"the captured micro-batch failed: {type(error).__name__}: {error}\n"
        write_text_atomic(out / "profile_train_graph.txt", text)
        print(text.split("\n\n")[0], flush=True)
    else:
        print("tune_decode, train_graph: not run (GPU timings; a graph needs CUDA)", flush=True)
    # Then the paths an earlier visit profiled, the one changed longest since first: the called
    # micro-batch (last profiled on the H100 visits; its ops' host calls changed since:
    # direct_ops.py), then decode at batch 256 (its >16-row split since the H200 visit) and 1.
    for name, make in (("train", train_profile),
                       (f"decode_b{wide}", functools.partial(decode_profile, batch=wide)),
                       ("decode", decode_profile), ("rl_ops", rl_ops_profile),
                       ("optimizer", optimizer_profile)):
        text = stamp + make(args.quick, device, dtype)
        write_text_atomic(out / f"profile_{name}.txt", text)
        print(text.split("\n\n")[0], flush=True)

if __name__ == "__main__":
    main()
