"""Triton kernels compiled ahead in child processes (kernels/ahead_of_time.py), and the demo's list
of launches (engine/demos/demo_launches.json)."""
import json
import multiprocessing
import subprocess
import sys
import textwrap

import pytest
import torch

from fusedrl.engine.demos.sorting import DEMO_LAUNCHES
from fusedrl.kernels import ahead_of_time
from fusedrl.kernels.model.swiglu import BLOCK_COLS
from kernel_testing import jit_env

# One launch of SiLU * up as gpucheck's recorder writes it (the children's scripts take it as
# their first argument).
SILU_RECORD = {"kernel": "fusedrl.kernels.model.swiglu:_silu_mul_kernel",
               "args": [["gate_up_ptr", {"tensor": "bfloat16", "misalign": 0}],
                        ["out_ptr", {"tensor": "bfloat16", "misalign": 0}],
                        ["n_cols", {"int": 896}]],
               "options": {"BLOCK": BLOCK_COLS}}


def in_jit_child(script: str, tmp_path, *args: str):
    """What `script` (Python run with Triton's real JIT and a cache of its own) prints as JSON."""
    out = subprocess.run([sys.executable, "-c", script, *args], env=jit_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)

# In a child with Triton's real JIT (no interpreter): children compile a recorded launch and a
# stale record for sm_90 into an empty cache; then this process launches the same kernel the way
# its op does (real tensors, `warmup`: the launch's binding, specialization and cache lookup
# without running), and the cache gains no file: the lookup found the children's binary.
LOOKUP = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path

    import torch
    from triton.runtime import driver

    from fusedrl.kernels import ahead_of_time
    from fusedrl.kernels.model.swiglu import BLOCK_COLS, _silu_mul_kernel

    record = json.loads(sys.argv[1])
    stale = {**record, "args": record["args"] + [["gone", {"int": 3}]]}
    compiled, failed = ahead_of_time.compile_in_children([record, stale], 90, workers=2).wait()
    cache = Path(os.environ["TRITON_CACHE_DIR"])
    files = lambda: sorted(p for p in cache.rglob("*") if p.is_file())
    before = files()
    driver.set_active(ahead_of_time.TargetDriver(90))
    gate_up = torch.randn(5, 2 * 896).to(torch.bfloat16)
    _silu_mul_kernel.warmup(gate_up, torch.empty(5, 896, dtype=torch.bfloat16), 896,
                            BLOCK=BLOCK_COLS, grid=(5, 1))
    json.dump({"compiled": compiled, "failed": failed, "before": len(before),
               "new": [str(p) for p in files() if p not in before]}, sys.stdout)
""")


@pytest.mark.integration
def test_a_launch_finds_the_binary_its_record_compiled_in_a_child(tmp_path):
    result = in_jit_child(LOOKUP, tmp_path, json.dumps(SILU_RECORD))
    assert result["compiled"] == 1 and len(result["failed"]) == 1, result
    assert result["failed"][0].startswith("fusedrl.kernels.model.swiglu:_silu_mul_kernel: "), result
    assert result["before"] > 0 and result["new"] == [], result


# In a child with Triton's real JIT and a CUDA device named sm_90 (none is there: the children
# never touch one): a list compiled whole leaves its stamp, and the same list again starts no
# child; a list with a stale record leaves none and compiles again next time.
STAMPED = textwrap.dedent("""
    import json, multiprocessing, sys

    import torch

    from fusedrl.kernels import ahead_of_time

    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    record = json.loads(sys.argv[1])
    stale = {**record, "args": record["args"] + [["gone", {"int": 3}]]}
    steps = {}
    for name, records in (("first", [record]), ("again", [record]), ("stale", [record, stale]),
                          ("stale again", [record, stale])):
        ahead = ahead_of_time.compile_ahead(records, workers=1)
        children = len(multiprocessing.active_children())
        compiled, failed = ahead.wait()
        steps[name] = {"children": children, "compiled": compiled, "failed": len(failed),
                       "stamped": ahead_of_time.stamp_path(records, 90).exists()}
    json.dump(steps, sys.stdout)
""")


@pytest.mark.integration
def test_a_list_compiled_whole_is_not_compiled_again(tmp_path):
    assert in_jit_child(STAMPED, tmp_path, json.dumps(SILU_RECORD)) == {
        "first": {"children": 1, "compiled": 1, "failed": 0, "stamped": True},
        "again": {"children": 0, "compiled": 0, "failed": 0, "stamped": True},
        "stale": {"children": 1, "compiled": 1, "failed": 1, "stamped": False},
        "stale again": {"children": 1, "compiled": 1, "failed": 1, "stamped": False}}


def test_the_stamp_names_the_records_and_the_architecture():
    record = json.loads(DEMO_LAUNCHES.read_text())[:1]
    stamps = {ahead_of_time.stamp_path(record, 90), ahead_of_time.stamp_path(record, 80),
              ahead_of_time.stamp_path(json.loads(DEMO_LAUNCHES.read_text())[:2], 90)}
    assert len(stamps) == 3 and all(p.parent.name == "fusedrl-ahead" for p in stamps)


def test_nothing_starts_without_a_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    record = json.loads(DEMO_LAUNCHES.read_text())[:1]
    ahead = ahead_of_time.compile_ahead(record)
    assert multiprocessing.active_children() == []
    assert ahead.wait() == (0, [])


# In a child with Triton's real JIT: each demo record's warmup binds and specializes its arguments
# as a launch does; a cache hook then stops it before compiling (binding is what a change to a
# kernel's arguments breaks; compiling all of them is the GPU's work).
BINDS = textwrap.dedent("""
    import json, sys
    from triton import knobs
    from triton.runtime import driver

    from fusedrl.kernels import ahead_of_time

    driver.set_active(ahead_of_time.TargetDriver(90))
    knobs.runtime.jit_cache_hook = lambda *args, **kwargs: True  # bound and keyed: stop there
    failed = []
    for record in json.load(open(sys.argv[1])):
        try:
            ahead_of_time.compile_record(record)
        except Exception as error:
            failed.append(f"{record['kernel']}: {type(error).__name__}: {error}")
    json.dump(failed, sys.stdout)
""")


@pytest.mark.integration
def test_every_demo_record_binds_to_its_kernel_as_it_is(tmp_path):
    """A record that no longer binds compiles nothing ahead (its launch compiles when it runs);
    tests/tools/record_demo_launches.py rewrites the list."""
    assert len(json.loads(DEMO_LAUNCHES.read_text())) >= 20  # the short demo's distinct launches
    assert in_jit_child(BINDS, tmp_path, str(DEMO_LAUNCHES)) == []


def test_argument_rebuilds_the_recorded_address_class():
    tensor = ahead_of_time.argument({"tensor": "bfloat16", "misalign": 6})
    assert tensor.dtype == torch.bfloat16 and tensor.data_ptr() % 16 == 6
    assert ahead_of_time.argument({"int": 896}) == 896
    assert ahead_of_time.argument({"const": None}) is None
