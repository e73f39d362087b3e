"""The host's share of a decode step and of a training micro-batch, counted and timed on the CPU
(no GPU: every figure here is a CPU count or a CPU time, never a GPU time).

A decode step on a GPU is one CUDA graph (ModelRunner.decode_step: embedding to sampler) and the
host work around it: the scheduler, the inputs written into DecodeInputs and sent, the graph
launched, the tokens read back, the sequences advanced. Here the engine runs that same path on the
CPU (DecodeGraphs(capture=False): the same buffers and padding, the replay run eagerly) with a model
so small (1 layer, hidden 64, the torch backend) that the step is almost all host, and everything
inside the replay (what the graph holds on a GPU) is left out of each figure:

- host time per decode step outside the graph (the lowest of ROUNDS medians of STEPS steps: the
  round least disturbed by the machine's other work), at batch 1, 64 and 256,
  with a cProfile breakdown (functions by their own time, the replay excluded). Times are the host
  thread's CPU time (time.thread_time), not wall time: on a shared machine a wall clock counts the
  other processes' turns too;
- host syncs per step (launch_count's: item / bool / nonzero / tolist / cpu / numpy ...);
- device ops launched per step outside the graph (launch_count's rules: copies count);
- tensors built from Python data (each one host-to-device copy on a GPU) and, of the copies to a
  device, the blocking ones: `torch.tensor(data, device=...)` and `.to(device)` without
  non_blocking, which on a GPU wait for the whole stream (a sync the dispatcher never sees).
  engine/data/device_tensors.py's non-blocking copies happen on a GPU only: on the CPU it makes
  the tensor where it is, so they count as built, not as copies.

A training micro-batch (bench_train_step's: forward_packed of 4 sequences of 8 tokens, the fused LM
head's log-probs, backward) is counted on the GPU's path (the Triton kernels, TRITON_INTERPRET=1,
value-reading checks off as on a GPU) at 1 and 2 layers, extrapolated to Qwen2.5-0.5B's 24. Its CPU
time (the median of the 25 least disturbed of 50 micro-batches at a negligible shape) is taken
on the torch backend at 2 layers, and on the GPU's path at 4 layers with every Triton launch skipped
(the interpreter's run made a no-op, so the kernels compute nothing): what is left is the host side
of our ops (their calls, autograd, buffers, checks) and of the rest of the step, the cost that made
the H100's micro-batch host-bound; Triton's own launcher is not in it. The GPU's path is timed
twice, in alternating rounds (a slow spell of the machine hits both): as the ops are called
(kernels/direct_ops.py: eager calls skip the custom op) and with every call through its custom op.

    python tests/tools/host_cost.py                    # bench/results/host_cost_cpu.{json,md}
    python tests/tools/host_cost.py --before OLD.json  # the md with OLD's figures beside
    python tests/tools/host_cost.py --render NEW.json --before OLD.json  # the md alone
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import statistics
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import torch

if not torch.cuda.is_available():
    # before any Triton kernel is defined; on a GPU machine the suite imports this module too,
    # and an interpreted kernel there copies CUDA tensors to the host
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fusedrl.bench import bench_train_step, harness, launch_count  # noqa: E402
from fusedrl.bench.shapes import qwen_like  # noqa: E402
from fusedrl.engine.inference.decode_graphs import DecodeGraphs  # noqa: E402
from fusedrl.engine.inference.llm import LLM  # noqa: E402
from fusedrl.engine.inference.request import Request  # noqa: E402
from fusedrl.engine.inference.sampling_params import SamplingParams  # noqa: E402
from fusedrl.kernels import use_backend  # noqa: E402
from fusedrl.kernels.direct_ops import DirectOp  # noqa: E402

from value_checks import value_checks_as_on_gpu  # noqa: E402

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
             head_dim=16)
BATCHES = (1, 64, 256)
STEPS = 200
MICRO_TOKENS, MICRO_SEQ = 32, 8  # bench_train_step's 1k tokens in 4 sequences, scaled down
ROUNDS = 3  # of STEPS steps each: the least disturbed round's median is the figure
PROMPT = 127
REAL_LAYERS = 24
TOP = 12  # cProfile rows kept


class HostCounter(launch_count.LaunchCounter):
    """launch_count's counter, plus tensors built from Python data and the copies to a device by
    kind (blocking or not); `outside(fn)` wraps fn so that nothing it does is counted (a graph's
    contents)."""

    def __init__(self):
        super().__init__()
        self.built = 0
        self.copies = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default:
            self.built += 1
        return super().__torch_dispatch__(func, types, args, kwargs)

    def __enter__(self):
        self._stack.enter_context(launch_count._patched(torch, "tensor", self._counting_tensor))
        self._stack.enter_context(launch_count._patched(torch.Tensor, "to", self._counting_to))
        return super().__enter__()

    def _counting_tensor(self, original):
        def tensor(data, *args, **kwargs):
            if kwargs.get("device") is not None:
                self.copies["blocking (torch.tensor(data, device=...))"] += 1
            return original(data, *args, **kwargs)
        return tensor

    def _counting_to(self, original):
        def to(tensor, *args, **kwargs):
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, (str, torch.device)):
                kind = "non-blocking" if kwargs.get("non_blocking") else "blocking (.to(device))"
                self.copies[kind] += 1
            return original(tensor, *args, **kwargs)
        return to

    def outside(self, fn):
        def call(*args, **kwargs):
            names, syncs = len(self.names), dict(self.syncs)
            built, copies = self.built, Counter(self.copies)
            try:
                return fn(*args, **kwargs)
            finally:
                del self.names[names:]
                self.syncs.clear()
                self.syncs.update(syncs)
                self.built, self.copies = built, copies
        return call


def decode_engine(batch: int) -> LLM:
    """An engine at its decode steps: `batch` greedy sequences (prompts of PROMPT tokens, EOS
    ignored) past their prefill, decoding on the graph path with the replay run eagerly."""
    torch.manual_seed(0)
    model = qwen_like(1, torch.float32, "cpu", **SMALL)
    llm = LLM(model, kv_cache_memory=64 << 20, max_num_seqs=batch, use_cuda_graphs=False)
    llm.runner.graphs = DecodeGraphs(llm.runner, batch, capture=False)
    params = SamplingParams(temperature=0, max_new_tokens=1 << 20, ignore_eos=True)
    for i in range(batch):
        llm.add(Request([10 + (i + j) % 400 for j in range(PROMPT)], params))
    for _ in range(10):  # the prefill, then warm decode steps
        llm.step()
    return llm


def decode_report(batch: int) -> dict:
    """Host time, syncs, launches and copies of one decode step at `batch`, the graph excluded."""
    with use_backend("torch"):
        llm = decode_engine(batch)
        graphs = llm.runner.graphs
        replay, inside = graphs.replay, []

        def timed_replay(size):
            start = time.thread_time()
            try:
                return replay(size)
            finally:
                inside.append(time.thread_time() - start)
        graphs.replay = timed_replay
        rounds = []
        for _ in range(ROUNDS):
            host = []
            for _ in range(STEPS):
                start = time.thread_time()
                llm.step()
                host.append(time.thread_time() - start - inside.pop())
            rounds.append(statistics.median(host))
        profile = cProfile.Profile()

        def unprofiled_replay(size):
            profile.disable()
            try:
                return replay(size)
            finally:
                profile.enable()
        graphs.replay = unprofiled_replay
        profile.enable()
        for _ in range(STEPS):
            llm.step()
        profile.disable()
        counter = HostCounter()
        graphs.replay = counter.outside(replay)
        with counter:
            llm.step()
    return {"batch": batch, "host_us_median": round(min(rounds) * 1e6, 1),
            "host_us_round_medians": [round(t * 1e6, 1) for t in rounds],
            "syncs": dict(counter.syncs), "launches": counter.launches,
            "launches_by_op": dict(Counter(counter.names)), "built_from_python": counter.built,
            "copies_to_device": dict(counter.copies), "profile": _top(profile)}


def _top(profile: cProfile.Profile) -> list[dict]:
    """The TOP functions by own time per step (microseconds), the replay excluded."""
    stats = pstats.Stats(profile).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:TOP]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls_per_step": calls / STEPS,
             "own_us_per_step": round(own / STEPS * 1e6, 1),
             "cumulative_us_per_step": round(cum / STEPS * 1e6, 1)}
            for (file, line, name), (_, calls, own, cum, _) in rows]


def micro_batch(model):
    """bench_train_step's micro-batch (MICRO_TOKENS tokens in sequences of MICRO_SEQ): the packed
    forward, the fused LM head's log-probs, backward."""
    return bench_train_step.micro_batch(model, MICRO_TOKENS, MICRO_SEQ, torch.device("cpu"))


def micro_batch_counts(layers: int) -> HostCounter:
    torch.manual_seed(0)
    model = qwen_like(layers, torch.float32, "cpu", **SMALL)
    run = micro_batch(model)
    with use_backend("triton"), value_checks_as_on_gpu():
        run()  # warm-up: per-(device, dtype) caches
        with HostCounter() as counter:
            run()
    return counter


@contextlib.contextmanager
def launches_skipped():
    """Within the block every Triton launch returns at once (the interpreter's run is a no-op):
    the ops' outputs are left unwritten, and their host side is all that runs."""
    from triton.runtime import interpreter
    with mock.patch.object(interpreter.InterpretedFunction, "run", lambda *args, **kwargs: None):
        yield


@contextlib.contextmanager
def through_custom_ops():
    """Within the block every fused op is called through its torch custom op (as before
    kernels/direct_ops.py: each call pays the custom op's wrapper)."""
    with mock.patch.object(DirectOp, "__call__", lambda self, *args, **kwargs: self.op(*args,
                                                                                      **kwargs)):
        yield


def _cpu_seconds(run, calls: int) -> list:
    times = []
    for _ in range(calls):
        start = time.thread_time()
        run()
        times.append(time.thread_time() - start)
    return times


def micro_batch_cpu_ms(layers: int) -> float:
    """The torch backend: the median CPU ms of the 25 least disturbed of 50 micro-batches."""
    torch.manual_seed(0)
    run = micro_batch(qwen_like(layers, torch.float32, "cpu", **SMALL))
    with use_backend("torch"):
        times = _cpu_seconds(run, 5 + 50)[5:]
    return round(statistics.median(sorted(times)[:25]) * 1e3, 3)


def gpu_path_cpu_ms(layers: int, rounds: int = 10, calls: int = 5) -> dict:
    """The GPU's path (Triton backend, launches skipped, value checks off): median CPU ms of
    `rounds` alternating rounds of `calls` micro-batches (each round's median), as the ops are
    called ("direct") and through their custom ops ("custom_ops")."""
    torch.manual_seed(0)
    run = micro_batch(qwen_like(layers, torch.float32, "cpu", **SMALL))
    medians = {"direct": [], "custom_ops": []}
    with use_backend("triton"), value_checks_as_on_gpu(), launches_skipped():
        for _ in range(rounds):
            for way, context in (("direct", contextlib.nullcontext), ("custom_ops",
                                                                    through_custom_ops)):
                with context():
                    medians[way].append(statistics.median(_cpu_seconds(run, 1 + calls)[1:]))
    return {way: round(statistics.median(m) * 1e3, 3) for way, m in medians.items()}


def micro_batch_report() -> dict:
    """Launches, syncs and copies of one micro-batch at 24 layers (1- and 2-layer counts
    extrapolated), and its CPU times (see the module docstring)."""
    one, two = micro_batch_counts(1), micro_batch_counts(2)
    layer = two.launches - one.launches
    return {"launches_per_layer": layer, "launches_outside_layers": one.launches - layer,
            f"launches_{REAL_LAYERS}_layers": one.launches + (REAL_LAYERS - 1) * layer,
            "syncs": dict(two.syncs), "built_from_python": two.built,
            "copies_to_device": dict(two.copies),
            "launches_outside_layers_by_op": _outside_layers(one, two),
            "cpu_ms_2_layers_torch_backend": micro_batch_cpu_ms(2),
            "cpu_ms_4_layers_gpu_path": gpu_path_cpu_ms(4)}


def _outside_layers(one: HostCounter, two: HostCounter) -> dict:
    """The ops of a 1-layer micro-batch less one layer's (the 2-layer count minus the 1-layer)."""
    a, b = Counter(one.names), Counter(two.names)
    return dict(sorted((a - (b - a)).items()))


def report() -> dict:
    return {"decode": [decode_report(b) for b in BATCHES], "micro_batch": micro_batch_report()}


def table(r: dict, before: dict | None) -> str:
    """Markdown: each figure with the `before` run's beside it where given."""
    def cell(now, old):
        return f"{now}" if old is None else f"{old} -> {now}"

    def total(d: dict) -> int:
        return sum(d.values())
    head = "| measure | " + ("before -> after" if before else "count") + " |"
    lines = [head, "| --- | --- |"]
    old_decode = {d["batch"]: d for d in before["decode"]} if before else {}
    for d in r["decode"]:
        o = old_decode.get(d["batch"], {})
        b = d["batch"]
        lines += [
            f"| decode batch {b}: host CPU us per step outside the graph (best round's median) | "
            f"{cell(d['host_us_median'], o.get('host_us_median'))} |",
            f"| decode batch {b}: host syncs per step | "
            f"{cell(total(d['syncs']), total(o['syncs']) if o else None)} |",
            f"| decode batch {b}: device ops launched outside the graph | "
            f"{cell(d['launches'], o.get('launches'))} |",
            f"| decode batch {b}: tensors built from Python data | "
            f"{cell(d['built_from_python'], o.get('built_from_python'))} |",
            f"| decode batch {b}: blocking copies to the device | "
            f"{cell(_blocking(d), _blocking(o) if o else None)} |"]
    m, o = r["micro_batch"], (before or {}).get("micro_batch")
    for key, label in ((f"launches_{REAL_LAYERS}_layers", f"launches at {REAL_LAYERS} layers"),
                       ("launches_per_layer", "launches per layer"),
                       ("launches_outside_layers", "launches outside the layers"),
                       ("built_from_python", "tensors built from Python data"),
                       ("cpu_ms_2_layers_torch_backend", "host CPU ms, 2 layers, torch backend")):
        lines.append(f"| training micro-batch: {label} | {cell(m[key], o[key] if o else None)} |")
    gpu_path, old_path = m["cpu_ms_4_layers_gpu_path"], (o or {}).get("cpu_ms_4_layers_gpu_path", {})
    for way, label in (("custom_ops", "every op through its custom op"),
                       ("direct", "the ops as called (eager: direct)")):
        lines.append(f"| training micro-batch: host CPU ms, 4 layers, the GPU's path with its "
                     f"launches skipped, {label} | "
                     f"{cell(gpu_path[way], old_path.get(way, '-') if o else None)} |")
    lines += [f"| training micro-batch: host syncs | "
              f"{cell(total(m['syncs']), total(o['syncs']) if o else None)} |",
              f"| training micro-batch: blocking copies to the device | "
              f"{cell(_blocking(m), _blocking(o) if o else None)} |"]
    return "\n".join(lines) + "\n"


def _blocking(d: dict) -> int:
    return sum(n for kind, n in d["copies_to_device"].items() if kind.startswith("blocking"))


def details(r: dict) -> str:
    lines = []
    for d in r["decode"]:
        lines += [f"Decode batch {d['batch']}: syncs {d['syncs']}; launches outside the graph "
                  f"{d['launches_by_op']}; copies {d['copies_to_device']}. Host time by function "
                  "(own us per step, the replay excluded):", ""]
        lines += [f"- {p['function']}: {p['own_us_per_step']} us own, "
                  f"{p['cumulative_us_per_step']} us with callees, "
                  f"{p['calls_per_step']:g} calls" for p in d["profile"]]
        lines.append("")
    m = r["micro_batch"]
    lines.append(f"Training micro-batch: syncs {m['syncs']}; copies {m['copies_to_device']}; "
                 f"launches outside the layers {m['launches_outside_layers_by_op']}.")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(RESULTS / "host_cost_cpu"), help="path without extension")
    p.add_argument("--before", help="an earlier run's json, shown beside this one in the md")
    p.add_argument("--render", help="a run's json: write its md (beside --before's) unmeasured")
    args = p.parse_args()
    torch.set_num_threads(1)  # the host's one thread, as a GPU's engine runs it
    out = Path(args.out)
    if args.render:
        r = json.loads(Path(args.render).read_text())
    else:
        r = {"meta": harness.run_metadata(torch.device("cpu")), **report()}
        out.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    before = json.loads(Path(args.before).read_text()) if args.before else None
    text = ("# Host cost of a decode step and a training micro-batch (CPU counts and CPU times)\n\n"
            + harness.meta_line(r["meta"])
            + "Written by `python tests/tools/host_cost.py`; see its docstring for what is "
            "counted. Times are the host thread's CPU time on this CPU, not a GPU host's, and "
            "cProfile's rows carry its own per-call overhead (read them as shares).\n\n"
            + table(r, before) + "\n"
            + details(r))
    if before:
        text += f"\nBefore: {harness.meta_line(before['meta'])}"
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
