"""A `fusedrl bench` run: the device and its limits, then each suite's cases in order, every row
recorded the moment it is measured (record.py), within the run's deadline (max_minutes=), each
case's budget (row_seconds=, what is left of the deadline at most) bounding its timed repetitions;
a case the deadline cuts gives rows saying `not run: time`. Between cases the context releases
what the next case does not name (Case.shares) and frees the device (context.free_device), so
every case, and every peer's process, finds the device as the first found it. SIGTERM
ends the run as Ctrl-C does, its files holding every finished row. Under torchrun (train and rl;
command.py refuses the others) every rank runs every case on its own device, each row's
figures combined over the ranks (ranks.py), and rank 0 alone writes the files and prints."""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import signal
import subprocess
import time
from typing import Callable

from . import ranks, results, triton_compiles
from .cases import NOT_RUN_TIME, Case, not_run, run_case
from .options import BenchOptions

PEERS = ("torch", "triton", "transformers", "trl", "liger-kernel", "matplotlib")
# Under --quick no case may take longer than this (a hard stop; the budget only bounds repetitions).
QUICK_CASE_S = 300.0


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return lines[0] if lines else None


def _versions() -> dict:
    out = {}
    for dist in ("fusedrl", *PEERS):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run_meta(device, limits, options: BenchOptions, command: str) -> dict:
    """What makes a result comparable: device, driver, limits, versions, commit, command, time."""
    from . import harness
    meta = harness.run_metadata(device)
    meta.update(commit=meta["git_commit"], driver=_driver(), limits=limits.as_dict(),
                versions=_versions(), command=command, model=options.model, seed=options.seed,
                quick=options.quick, max_minutes=options.max_minutes,
                row_seconds=options.row_seconds)
    return meta


def suite_backend(device, options: BenchOptions) -> str:
    """The kernel backend the engine runs: the default ("auto") on a GPU; on the CPU the PyTorch
    backend, what the engine runs there, unless interpret=true asks for our Triton kernels in the
    interpreter."""
    return "auto" if device.type == "cuda" or options.interpret else "torch"


class Clock:
    """The run's deadline (max_minutes) and each case's budget (row_seconds): the seconds of timed
    repetitions a case may spend (budget), and when it is stopped (limit: the deadline; under
    --quick at most QUICK_CASE_S); None for no limit. Under torchrun the ranks agree: the deadline
    counts as passed when it has on any rank, and no timer stops a case (one rank stopped inside a
    case would leave the others waiting in a collective): it runs to its end."""

    def __init__(self, options: BenchOptions):
        self.start = time.monotonic()
        self.deadline = None if options.max_minutes is None else options.max_minutes * 60
        self.per_case = options.row_seconds
        self.quick = options.quick

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - (time.monotonic() - self.start)

    def budget(self) -> float | None:
        left = self.left()
        if left is None:
            return self.per_case
        return left if self.per_case is None else min(left, self.per_case)

    def past_deadline(self) -> bool:
        """Whether the run's deadline has passed (on any rank: every rank skips the same cases)."""
        left = self.left()
        return left is not None and ranks.agreed_least(left) <= 0

    def limit(self) -> tuple[float | None, str]:
        """(the seconds after which a case is stopped, what that limit is)."""
        if ranks.several():
            return None, "none under torchrun"
        left = self.left()
        if self.quick and (left is None or left > QUICK_CASE_S):
            return QUICK_CASE_S, "a case's most under --quick"
        return left, "the run's deadline"

    def describe(self, cases_left: int, suites_left: list[str]) -> str:
        text = f"{cases_left} cases left" + (f", then {' '.join(suites_left)}"
                                             if suites_left else "")
        left = self.left()
        return text + ("" if left is None else f", {max(left, 0):.0f} s to the deadline")


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_cases(cases: list[Case], ctx, clock: Clock, add: Callable[[dict, str, Case], None],
              suites_left: list[str] = ()) -> None:
    """The cases in order, add(row, progress, case) for each row as it comes (progress: what is
    left, as the row comes); after each case what the next one does not name in its shares is
    released and the device freed (Context.release)."""
    ctx.release(cases[0].shares if cases else ())
    for k, case in enumerate(cases):
        def emit(row, k=k, case=case):
            add(row, clock.describe(len(cases) - k - 1, list(suites_left)), case)
        if clock.past_deadline():
            for row in not_run(case, case.impls, f"{NOT_RUN_TIME} (the run's deadline)"):
                emit(row)
            continue
        run_case(case, clock.budget(), emit, *clock.limit())
        ctx.release(cases[k + 1].shares if k + 1 < len(cases) else ())


def run_suites(suites: list[str], ctx, recorder, clock: Clock) -> None:
    """Every case of every suite, in order, each row recorded as it comes."""
    from fusedrl.kernels import use_backend
    for i, suite in enumerate(suites):
        module = importlib.import_module(f"fusedrl.bench.suites.{suite}")
        with ctx.scope(), use_backend(suite_backend(ctx.device, ctx.options)):
            cases = [case for case in module.cases(ctx) if ctx.wanted(f"{suite}: {case.name}")]
            run_cases(cases, ctx, clock,
                      lambda row, left, case: recorder.add(
                          ranks.combine(ctx.named(row, case.model_paths)), left),
                      suites[i + 1:])


def run(suites: list[str], options: BenchOptions, command: str) -> dict:
    """Run the suites in order; returns the payload (meta and rows). command: the command line,
    as the record names it."""
    import torch
    if not torch.cuda.is_available() and options.interpret:
        # Triton reads this when the kernels are defined, i.e. at `import fusedrl.kernels`.
        os.environ["TRITON_INTERPRET"] = "1"
    from fusedrl.kernels.attention import packed_attention_kernel

    from .context import Context
    from .devices import device_limits
    from .record import Recorder
    device = ranks.start("cuda" if torch.cuda.is_available() else "cpu")
    main = ranks.is_main()
    clock = Clock(options)
    limits = device_limits(device)
    ctx = Context(device, limits, options)
    meta = run_meta(device, limits, options, command)
    meta["backend"] = suite_backend(device, options)
    meta["triton_interpreter"] = device.type == "cpu" and options.interpret
    meta["attention"] = packed_attention_kernel(device)
    meta["world_size"] = ranks.world_size()
    recorder = Recorder(options.output_dir if main else None, meta, quiet=not main,
                        overwrite=options.overwrite, inputs=options.inputs())
    if main:
        print(f"fusedrl bench {' '.join(suites)}: {meta['device']}"
              f"{_ranks_text(meta['world_size'])}, kernel backend {meta['backend']}"
              f"{' (Triton interpreter)' if meta['triton_interpreter'] else ''}; limits "
              f"{limits.label}: {limits.flops_per_s / 1e12:.3g} TFLOP/s, "
              f"{limits.bytes_per_s / 1e9:.3g} GB/s", flush=True)
    before = signal.signal(signal.SIGTERM, _terminate)
    ended = "interrupted"
    try:
        with _compiles_recorded(device, options):
            run_suites(suites, ctx, recorder, clock)
        ended = "complete"
    finally:
        signal.signal(signal.SIGTERM, before)
        recorder.close(ended)
        ranks.stop()
    if main:
        print(results.markdown(recorder.payload))
        if options.output_dir:
            print(f"results: {os.path.join(options.output_dir, 'results.json')}")
    return recorder.payload


def _compiles_recorded(device, options: BenchOptions):
    """On a GPU: the Triton kernels the run compiles, for the next visit's prebuilt cache
    (triton_compiles.py), in the file FUSEDRL_TRITON_COMPILES names (bench/gpu.sh: one per call),
    else in OUTPUT_DIR/triton_compiles.jsonl; nothing without either."""
    path = os.environ.get(triton_compiles.RECORD_ENV) or (
        options.output_dir and os.path.join(options.output_dir, "triton_compiles.jsonl"))
    if device.type != "cuda" or not path or not ranks.is_main():
        return contextlib.nullcontext()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return triton_compiles.recording(path)


def _ranks_text(world: int) -> str:
    return f" x {world} ranks (figures per GPU and in total)" if world > 1 else ""
