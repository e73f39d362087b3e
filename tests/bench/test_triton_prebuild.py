"""The prebuilt Triton cache a GPU visit carries (tests/tools/triton_prebuild.py): a compile that
a GPU process records (bench/triton_compiles.py) is rebuilt here under the same cache hash, and so
is a launch the static check's workload records; the key of another Python's Triton build; a
visit's hits against a manifest.

The round trip runs Triton's real JIT in a child process (no interpreter) on a stand-in driver
that names an sm_90 target, so `warmup` compiles as a GPU process would, without a GPU."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from fusedrl.bench.triton_compiles import hits
from gpucheck.target_key import translated_key
from kernel_testing import jit_env, needs_interpreter


ROUND_TRIP = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import torch
    from triton.runtime import driver

    from fusedrl.bench.triton_compiles import recording
    from fusedrl.kernels.model.swiglu import BLOCK_COLS, _silu_mul_kernel
    import triton_prebuild
    from gpucheck.compile import TargetDriver, compile_launch

    record, out = sys.argv[1], sys.argv[2]
    driver.set_active(TargetDriver(90))  # the JIT compiles for sm_90; no kernel is launched
    gate_up = torch.empty(3, 2 * 896, dtype=torch.bfloat16)
    with recording(record):
        jit_hash = _silu_mul_kernel.warmup(gate_up, torch.empty(3, 896, dtype=torch.bfloat16), 896,
                                           BLOCK=BLOCK_COLS, grid=(3, 1)).hash
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    manifest = triton_prebuild.prebuild(Path(out), python, 90, [Path(record)], workload=False,
                                        quick=True)
    # The static check's record of the same launch (gpucheck/record.py's form), compiled as the
    # workload's launches are.
    described = {"kernel": "fusedrl.kernels.model.swiglu:_silu_mul_kernel",
                 "args": [["gate_up_ptr", {"tensor": "bfloat16", "misalign": 0}],
                          ["out_ptr", {"tensor": "bfloat16", "misalign": 0}],
                          ["n_cols", {"int": 896}]],
                 "options": {"BLOCK": BLOCK_COLS}}
    static_hash = compile_launch(described, 90)[0].hash
    json.dump({"jit": jit_hash, "prebuilt": [k["hash"] for k in manifest["kernels"]],
               "static": static_hash}, sys.stdout)
""")


@pytest.mark.integration
def test_a_recorded_compile_is_rebuilt_under_the_gpu_processs_hash(tmp_path):
    env = jit_env(tmp_path)
    record = tmp_path / "triton_compiles.jsonl"
    out = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(record), str(tmp_path / "prebuilt")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    hashes = json.loads(out.stdout)
    line = json.loads(record.read_text().splitlines()[0])
    assert line["kernel"] == "fusedrl.kernels.model.swiglu:_silu_mul_kernel"
    assert line["hash"] == hashes["jit"]
    assert hashes["prebuilt"] == [hashes["jit"]]
    assert hashes["static"] == hashes["jit"]
    # the prebuilt cache holds the kernel where Triton looks it up (a folder per hash)
    assert any((tmp_path / "prebuilt" / "cache").glob("*/_silu_mul_kernel.cubin"))


OLDER_RECORD = textwrap.dedent("""
    import json, sys

    import torch
    from triton.runtime import driver

    from fusedrl.bench.triton_compiles import recording
    from fusedrl.kernels.model.norm_linear import _norm_linear_kernel
    from gpucheck.compile import TargetDriver, compile_specialization

    record = sys.argv[1]
    driver.set_active(TargetDriver(90))
    x = torch.empty(2, 896, dtype=torch.bfloat16)
    w = torch.empty(1152, 896, dtype=torch.bfloat16)
    with recording(record):
        jit_hash = _norm_linear_kernel.warmup(
            x, x, x, x[0], w, w[:, 0], torch.empty(2, 1152, dtype=torch.bfloat16), 2, 1152, 1e-6,
            K=896, HAS_RESIDUAL=True, HAS_BIAS=True, GLU=False, INTERPRETED=False, BLOCK_M=16,
            BLOCK_N=16, BLOCK_K=128, grid=(1, 72)).hash
    spec = json.loads(json.loads(open(record).readline())["specialization"])
    # The same launch recorded before the kernel took INTERPRETED (an argument mid-signature):
    # the later constants one place earlier, INTERPRETED absent.
    names = list(spec["signature"])
    at = names.index("INTERPRETED")
    back = lambda keys: [[k[0] - (k[0] > at), *k[1:]] for k in keys if k[0] != at]
    vals = [v for k, v in zip(spec["constant_keys"], spec["constant_vals"]) if k[0] != at]
    older = {**spec, "signature": {n: t for n, t in spec["signature"].items() if n != "INTERPRETED"},
             "constant_keys": back(spec["constant_keys"]), "constant_vals": vals,
             "attrs_keys": back(spec["attrs_keys"])}
    rebuilt = compile_specialization(json.dumps(older), 90).hash
    try:  # an argument the kernel no longer takes: a stale record, not a wrong entry
        compile_specialization(json.dumps({**spec, "signature": {**spec["signature"], "gone": "i32"}}), 90)
        stale = "compiled"
    except ValueError as error:
        stale = str(error)
    json.dump({"jit": jit_hash, "rebuilt": rebuilt, "stale": stale}, sys.stdout)
""")


@pytest.mark.integration
def test_a_record_from_before_the_interpreter_switch_is_rebuilt_with_it_off(tmp_path):
    """A record taken before a kernel took INTERPRETED (GPU processes always pass it False) is
    rebuilt as the GPU now launches it; a record with an argument the kernel no longer takes is
    refused as stale."""
    env = jit_env(tmp_path)
    out = subprocess.run([sys.executable, "-c", OLDER_RECORD, str(tmp_path / "record.jsonl")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    hashes = json.loads(out.stdout)
    assert hashes["rebuilt"] == hashes["jit"]
    assert "recorded with other arguments (gone: ['gone']" in hashes["stale"]


COMPILE_RECORDS = textwrap.dedent("""
    import json, sys
    from gpucheck.compile import compile_launch

    json.dump([compile_launch(record, 90)[0].hash for record in json.load(sys.stdin)], sys.stdout)
""")


@pytest.mark.integration
@needs_interpreter
def test_launches_share_a_record_exactly_when_they_share_a_binary(tmp_path):
    """gpucheck's recording keeps one launch per specialization key; the prebuild and the static
    check compile one binary per record. Each launch recorded alone, then compiled by Triton's real
    JIT for sm_90: two launches have one key exactly when they have one hash. The norm's row count
    is do_not_specialize (1, 90 and 112 rows: one binary); SiLU * up's width is not (90 and 112
    columns: two, a multiple of 16 apart)."""
    from fusedrl.kernels import use_backend
    from fusedrl.kernels.model.norm import rms_norm
    from fusedrl.kernels.model.swiglu import silu_mul
    from gpucheck.record import recording
    launches = ([lambda n=n: rms_norm(torch.randn(n, 96), torch.ones(96), 1e-6)
                 for n in (1, 90, 112)]
                + [lambda n=n: silu_mul(torch.randn(3, 2 * n)) for n in (90, 112)])
    keys, records = [], []
    with use_backend("triton"):
        for launch in launches:
            with recording({}) as recorded:
                launch()
            (key, record), = recorded.items()
            keys.append(key)
            records.append(record)
    out = subprocess.run([sys.executable, "-c", COMPILE_RECORDS], input=json.dumps(records),
                         env=jit_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    hashes = json.loads(out.stdout)
    assert len(set(keys[:3])) == 1 and len(set(keys[3:])) == 2, keys
    for i in range(len(keys)):
        for j in range(len(keys)):
            assert (keys[i] == keys[j]) == (hashes[i] == hashes[j]), (i, j, keys, hashes)


@needs_interpreter
def test_an_unexecuted_launch_is_recorded_and_not_run():
    """gpucheck's `unexecuted` (the bench engine's graph warm-ups): each launch is recorded as
    when it runs, and its output is left as it was; outside the block launches run again."""
    from fusedrl.kernels.model.swiglu import BLOCK_COLS, _grid, _silu_mul_kernel
    from gpucheck.record import recording, unexecuted
    gate_up = torch.randn(3, 2 * 40)

    def launch(out):
        _silu_mul_kernel[_grid(3, 40)](gate_up, out, 40, BLOCK=BLOCK_COLS)
        return out
    with recording({}) as skipped, unexecuted():
        untouched = launch(torch.zeros(3, 40))
    with recording({}) as ran:
        written = launch(torch.zeros(3, 40))
    assert list(skipped) == list(ran) and len(ran) == 1
    assert not untouched.any()
    gate, up = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(written.double(), torch.nn.functional.silu(gate) * up)


def test_the_key_of_another_python_replaces_libtritons_digest_once():
    key = "3.6.0" + "-".join(["aa" * 32, "bb" * 32, "cc" * 32])
    assert translated_key(key, "bb" * 32, "dd" * 32) == key.replace("bb" * 32, "dd" * 32)
    with pytest.raises(ValueError, match="0 times, expected once"):
        translated_key(key, "ee" * 32, "dd" * 32)


def test_a_visits_hits_are_its_kernels_found_in_the_manifest(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"kernels": [{"kernel": "m:a", "hash": "h1"},
                                                {"kernel": "m:b", "hash": "h2"}]}))
    record = tmp_path / "triton_compiles.jsonl"
    lines = [{"kernel": "m:a", "hash": "h1"}, {"kernel": "m:c", "hash": "h3"},
             {"kernel": "m:a", "hash": "h1"},  # a second process loading the same kernel
             {"kernel": "m:d", "error": "KeyError: 'device'"}]  # the hook read no hash
    record.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert hits(str(record), str(manifest)) == {"kernels_used": 2, "prebuilt": 2, "hits": 1,
                                                "missed_kernels": ["m:c"],
                                                "unrecorded_kernels": ["m:d"]}


def test_a_fusedrl_command_runs_under_the_record_its_environment_names(tmp_path, monkeypatch):
    """`python -m fusedrl.bench.triton_compiles fusedrl ARGS` (the GPU visit's demo stage) runs the
    command in this process with Triton's post-compile hook writing to FUSEDRL_TRITON_COMPILES's
    file, passes its exit code back and leaves the hook as it found it; a bad command line gets
    the usage and 2."""
    from triton import knobs

    from fusedrl.bench import triton_compiles
    from fusedrl.engine.cli import commands

    record = tmp_path / "compiles.jsonl"
    monkeypatch.setenv(triton_compiles.RECORD_ENV, str(record))
    seen = {}

    def command(argv):
        seen["argv"], seen["hook"] = argv, knobs.runtime.jit_post_compile_hook
        return 3

    monkeypatch.setattr(commands, "main", command)
    before = knobs.runtime.jit_post_compile_hook
    assert triton_compiles.main(["fusedrl", "demo", "seed=1"]) == 3
    assert seen["argv"] == ["demo", "seed=1"] and seen["hook"] is not before
    assert knobs.runtime.jit_post_compile_hook is before
    assert triton_compiles.main(["fusedrl"]) == 2
