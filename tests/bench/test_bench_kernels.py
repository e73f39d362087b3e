"""The kernel benchmark runs (small shapes) and writes a complete report. Times are not checked."""
import json

import pytest
import torch

from fusedrl.bench import bench_kernels
from kernel_testing import CUDA_EXT_RUNS, DEVICE, needs_triton

try:
    import pytest_benchmark
except ImportError:  # e.g. the GPU image; the benchmark itself still runs in gpu.sh
    pytest_benchmark = None

pytestmark = needs_triton
QUICK_CASES = bench_kernels.all_cases(quick=True)


@pytest.mark.skipif(pytest_benchmark is None, reason="pytest-benchmark is not installed")
@pytest.mark.parametrize("impl", ["fusedrl", "eager"])
@pytest.mark.parametrize("case", QUICK_CASES, ids=[f"{c.op}-{c.mode}" for c in QUICK_CASES])
def test_case_runs(benchmark, case, impl):
    thunk = case.impls[impl](case.make_inputs(torch.device(DEVICE)))
    benchmark.pedantic(thunk, rounds=2, iterations=1)


def test_report(tmp_path):
    out = tmp_path / "kernels.json"
    bench_kernels.main(["--quick", "--ops", "gae,kl_penalty", "--skip", "torch.compile",
                        "--budget", "0", "--min-reps", "1", "--json", str(out)])
    payload = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "git_commit", "copy_gbps"):
        assert key in payload["meta"]
    rows = {(r["op"], r["impl"]): r for r in payload["results"]}
    # The CUDA backend's rows appear where its extension is built (a GPU run of gpu.sh).
    fused = ("fusedrl", "cuda") if CUDA_EXT_RUNS else ("fusedrl",)
    assert set(rows) == {("gae", "eager"), ("gae", "python loop (TRL)"), ("kl_penalty", "eager"),
                         *((op, impl) for op in ("gae", "kl_penalty") for impl in fused)}
    assert all(r["ms"] > 0 and r["gbps"] > 0 and "error" not in r for r in rows.values())
    # the small ops' host cost and launches beside the time; the fused KL is one launch each way
    assert all(r["host_us"] > 0 and r["host_syncs"] == 0 for r in rows.values())
    launches = {(r["op"], r["mode"], r["impl"]): r["launches"] for r in payload["results"]}
    assert launches[("kl_penalty", "fwd", "fusedrl")] == 1 and launches[("kl_penalty", "fwd+bwd", "fusedrl")] == 2
    assert launches[("gae", "fwd", "fusedrl")] == 1


def test_linear_row_reports_the_three_gemm_floor(tmp_path):
    out = tmp_path / "linear.json"
    bench_kernels.main(["--quick", "--ops", "linear_token_logprobs", "--skip",
                        "torch.compile,eager,matmul+token_logprobs", "--budget", "0",
                        "--min-reps", "1", "--json", str(out)])
    payload = json.loads(out.read_text())
    rows = {(r["mode"], r["impl"]): r for r in payload["results"]}
    # forward alone and forward + backward, each the default and the cuBLAS way side by side
    assert set(rows) == {(mode, impl) for mode in ("fwd", "fwd+bwd") for impl in ("fusedrl", "fusedrl cuBLAS")}
    n_rows, hidden, vocab = 64, 32, 1000  # bench_kernels' quick linear shape
    gemm_ms = 2 * n_rows * hidden * vocab / (payload["meta"]["matmul_tflops"] * 1e12) * 1e3
    for (mode, _), row in rows.items():
        floor_ms = gemm_ms * (3 if mode == "fwd+bwd" else 1)
        assert row["floor_ms"] == pytest.approx(floor_ms)
        assert row["frac_of_floor"] == pytest.approx(floor_ms / row["ms"])


def test_logprob_entropy_rows_compute_what_trls_two_passes_compute():
    """The headline's log-prob + entropy from logits: every implementation runs, and TRL's two
    passes (its published claim's baseline) give our values, so the rows time the same thing."""
    cases = bench_kernels.logprobs_entropy_cases(5, 257, torch.float32)
    assert [c.op for c in cases] == ["token_logprobs+entropy"]
    inputs = cases[0].make_inputs(torch.device(DEVICE))
    for impl in ("fusedrl", "eager", *(("trl",) if "trl" in cases[0].impls else ())):
        cases[0].impls[impl](inputs)()
    trl = bench_kernels.trl_logprob_entropy()
    if trl is None:
        pytest.skip("trl is not installed")
    logp, entropy = trl(inputs["logits"], inputs["labels"])
    want_logp, want_entropy = bench_kernels.reference.token_logprobs(
        inputs["logits"].double(), inputs["labels"], return_entropy=True)
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), want_entropy, rtol=1e-5, atol=1e-5)
