"""The options of `fusedrl bench` (torch-free): the suites, the named shapes and one run's
key=value options, checked into BenchOptions with one-line errors."""
from __future__ import annotations

import dataclasses
import os

from fusedrl.engine.errors import UsageError
from fusedrl.engine.runs import run_dir

# Every suite, in the order `all` runs them: the headline set first (one row per claim).
SUITE_HELP = {
    "headline": "one row per claim (decode at batch 1 and 256, the mixed workload, the sampler, "
                "a 1k-token training micro-batch, the small RL ops, the fused head, GRPO and PPO "
                "iterations, the distillation divergence, an MoE decode step), each beside its "
                "peer",
    "kernels": "every fused op against eager PyTorch, torch.compile and the installed peers "
               "(Liger, TRL 1.x's fused head): time, peak memory, bytes moved, fraction of "
               "the memory bandwidth",
    "generate": "decode at batch 1 and 256 and the mixed workload (256 requests, prompt and "
                "output lengths uniform in [100, 1024]): tok/s and fraction of the decode roofline",
    "train": "one training micro-batch (forward + backward) and optimizer step: tokens/s, MFU",
    "rl": "a GRPO and a PPO iteration per phase: tokens/s/GPU, weight-sync time, peak memory "
          "beside `fusedrl plan`'s prediction; TRL 1.x's GRPOTrainer where installed",
}
SUITES = tuple(SUITE_HELP)
# The suites whose cases run on every rank under torchrun (each rank issuing the same
# collectives: bench/ranks.py); the others run in one process.
PER_RANK_SUITES = ("train", "rl")
# The kind of the marker (engine/runs/run_dir.py) a bench run's output_dir carries.
BENCH_KIND = "bench"
SHAPE_NAMES = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3.1-8b", "qwen3-30b-a3b")


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """The key=value options of a suite run."""
    model: str = "qwen2.5-0.5b"   # a named shape (shapes.py, random weights) or a local HF dir
    seed: int = 0
    output_dir: str | None = None
    overwrite: bool = False
    only: tuple[str, ...] = ()     # run the cases whose name holds one of these (all: empty)
    quick: bool = False
    max_minutes: float | None = None  # the run's deadline: cases past it are "not run: time"
    row_seconds: float | None = None  # a case's budget for its timed repetitions (None: what
    # the deadline leaves); its first measurement is never refused
    interpret: bool = False        # CPU: our Triton kernels in the interpreter (else torch's)

    def __post_init__(self):
        if self.model not in SHAPE_NAMES and self.model != "qwen3-0.6b" \
                and not os.path.isdir(self.model):
            raise ValueError(f"model={self.model}: expected one of {', '.join(SHAPE_NAMES)} or "
                             f"a local Hugging Face directory")
        for key in ("max_minutes", "row_seconds"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"{key}={value}: expected a positive number")
        if self.output_dir is not None:
            # The rules of every fusedrl output directory (engine/runs/run_dir.py): new, empty, or
            # an earlier bench run (replaced only with overwrite=true); a directory fusedrl did
            # not make, or another command's, is refused whatever overwrite says.
            try:
                run_dir.check_target(self.output_dir, BENCH_KIND, overwrite=self.overwrite,
                                     inputs=self.inputs())
            except UsageError as e:
                raise ValueError(str(e)) from None

    def inputs(self) -> tuple[str, ...]:
        """What the run reads from disk (a local model directory), never to be replaced."""
        return (self.model,) if self.model not in SHAPE_NAMES and os.path.isdir(self.model) else ()


def _boolean(key: str, value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ValueError(f"{key}={value}: expected true or false")
    return value.lower() == "true"


def _number(key: str, value: str, kind: type):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{key}={value}: expected {'an integer' if kind is int else 'a number'}") \
            from None


def parse_options(pairs: list[str], quick: bool) -> BenchOptions:
    """key=value strings -> BenchOptions; one-line ValueError naming a bad key or value."""
    fields = {f.name: f for f in dataclasses.fields(BenchOptions) if f.name != "quick"}
    values: dict = {"quick": quick}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"{pair!r}: expected key=value with key one of {', '.join(fields)}")
        if key == "seed":
            values[key] = _number(key, value, int)
        elif key in ("max_minutes", "row_seconds"):
            values[key] = _number(key, value, float)
        elif key == "only":
            values[key] = tuple(part for part in value.split(",") if part)
        elif key in ("overwrite", "interpret"):
            values[key] = _boolean(key, value)
        else:
            values[key] = value
    return BenchOptions(**values)
