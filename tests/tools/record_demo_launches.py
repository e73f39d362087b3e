"""Record the Triton launches `fusedrl demo` makes on a GPU into engine/demos/demo_launches.json,
the list the demo compiles ahead of time in parallel (kernels/ahead_of_time.py).

A short demo (SHORT: every stage of the default task at its real shapes, fewer prompts, steps and
iterations) runs on the GPU's path in the interpreter: the Triton backend, bf16-mixed, value
checks as on a GPU, under gpucheck's recorder, which keeps one record per specialization (dtypes,
pointer alignment, int classes, constexprs). A specialization the full demo reaches and the short
one does not (an int class of a batch size it never meets) compiles at its first launch, as
without the list. Rerun after a change to the kernels' arguments or to what the demo launches;
the suite checks that every record still binds (tests/kernels/test_compile_ahead.py).

    python tests/tools/record_demo_launches.py   # about 20 minutes on 2 CPU cores: all interpreted
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Before any Triton kernel is defined; a GPU machine's tensors stay on the host (the interpreter's).
os.environ["TRITON_INTERPRET"] = "1"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["FUSEDRL_BACKEND"] = "triton"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fusedrl.engine.config.demo import DemoConfig  # noqa: E402
from fusedrl.engine.demos.sorting import DEMO_LAUNCHES, run_demo  # noqa: E402
from gpucheck.record import recording  # noqa: E402
from value_checks import value_checks_as_on_gpu  # noqa: E402

# rl_prompts at the demo's 16: its PPO minibatch (64 rows) and decode batch sizes.
SHORT = dict(train_prompts=64, eval_prompts=4, sft_epochs=1, rm_epochs=1, rl_iterations=2,
             eval_samples=1, precision="bf16-mixed")


def record() -> list[dict]:
    """The short demo's distinct launches, sorted (records without their grids)."""
    # Every stage's modules first: value_checks_as_on_gpu patches the kernel modules loaded.
    for stage in ("ppo.trainer", "rm", "sft"):
        importlib.import_module(f"fusedrl.engine.stages.{stage}")
    launches: dict = {}
    with tempfile.TemporaryDirectory() as tmp, recording(launches), value_checks_as_on_gpu():
        run_demo(DemoConfig(output_dir=str(Path(tmp) / "demo"), **SHORT), quiet=True)
    records = [{k: v for k, v in r.items() if k != "grid"} for r in launches.values()]
    return sorted(records, key=lambda r: json.dumps(r, sort_keys=True))


def main() -> int:
    start = time.perf_counter()
    records = record()
    # a record a line: a rerun's diff shows the launches that came and went
    DEMO_LAUNCHES.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    kernels = {r["kernel"] for r in records}
    print(f"record_demo_launches: {len(records)} specializations of {len(kernels)} kernels -> "
          f"{DEMO_LAUNCHES} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
