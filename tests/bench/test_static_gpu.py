"""The static GPU check's parts: occupancy, the PTX data flow that names a stream's pointer, and what
fails a row. The check itself (record the workload's launches in the interpreter, compile each for
sm_80 and sm_90) is a step of .ci/run under triton 3.6, the GPU image's, before the suite; its run
under the venv's triton and with the CUDA objects is committed in bench/results/static_gpu.*. It is
not a test here as well: recording the workload in the interpreter costs minutes of 2 cores, and one
run per CI checks it."""
from pathlib import Path

import static_gpu
from gpucheck.compile import ptx_accesses
from gpucheck.occupancy import occupancy


def test_occupancy_limits():
    assert occupancy(90, 190, 0, 4) == {"blocks": 2, "warps": 8, "limit": "registers"}
    assert occupancy(80, 24, 0, 8)["limit"] == "warps"
    assert occupancy(80, 32, 100 * 1024, 4) == {"blocks": 1, "warps": 4, "limit": "shared"}


def test_ptx_data_flow_names_the_pointer():
    ptx = """
    ld.param.b64 %rd1, [k_param_0];
    ld.param.b64 %rd2, [k_param_2];
    mul.wide.s32 %rd3, %r1, 2;
    add.s64 %rd4, %rd1, %rd3;
    @%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd4 + 0 ];
    add.s64 %rd5, %rd2, %rd3;
    st.global.b16 [ %rd5 + 0 ], { %rs1 };
    """
    assert ptx_accesses(ptx) == [("ld", 128, {0}), ("st", 16, {2})]
    pipelined = """
    ld.param.b64 %rd1, [k_param_1];
    add.s64 %rd6, %rd1, %rd3;
    cp.async.cg.shared.global [ %r34 + 0 ], [ %rd6 + 0 ], 0x10, %r35;
    cp.async.ca.shared.global [ %r36 + 0 ], [ %rd6 + 0 ], 4, %r37;
"""
    assert ptx_accesses(pipelined) == [("ld", 128, {1}), ("ld", 32, {1})]


def test_a_16_bit_gemm_without_tensor_cores_fails():
    row = {"kernel": "_logit_grad_kernel", "spill_bytes": 0, "aligned": False,
           "args": {"w_ptr": {"tensor": "bfloat16", "misalign": 0}}, "mma": {}}
    assert static_gpu.problems(row) == ["16-bit GEMM without tensor-core instructions"]
    assert static_gpu.problems({**row, "mma": {"HGMMA": 4}}) == []
    fp32 = {**row, "args": {"w_ptr": {"tensor": "float32", "misalign": 0}}}
    assert static_gpu.problems(fp32) == []  # full-fp32 products: no tensor cores expected


def test_a_gemv_launch_wants_no_tensor_cores_and_may_read_its_activation_row_narrower():
    """norm_linear at a row tile under 16 (a GEMV: tile_dot's sums on the CUDA cores); the weight's
    stream still needs 128-bit loads, and a launch at 16 rows still needs the tensor cores."""
    streams = {"W tiles": {"kind": "ld", "widths": [128]}, "x rows": {"kind": "ld", "widths": [64]}}
    row = {"kernel": "_norm_linear_kernel", "spill_bytes": 0, "aligned": True, "mma": {},
           "args": {"w_ptr": {"tensor": "bfloat16", "misalign": 0}}, "config": {"BLOCK_M": 1},
           "streams": streams}
    assert static_gpu.problems(row) == []
    narrow_w = {**streams, "W tiles": {"kind": "ld", "widths": [64]}}
    assert static_gpu.problems({**row, "streams": narrow_w}) == ["W tiles: no 128-bit access ([64])"]
    assert static_gpu.problems({**row, "config": {"BLOCK_M": 16}}) == [
        "16-bit GEMM without tensor-core instructions", "x rows: no 128-bit access ([64])"]


def test_the_cuda_check_compiles_csrc_sources():
    """The CUDA half of the check globs csrc/*.cu from the repository's top: a wrong top finds no
    source and reports 0 CUDA kernels with 0 failures."""
    from gpucheck import cuda
    assert sorted(p.name for p in (cuda.ROOT / "csrc").glob("*.cu")) == sorted(
        p.name for p in (Path(__file__).resolve().parents[2] / "csrc").glob("*.cu")) != []
