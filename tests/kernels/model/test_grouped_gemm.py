"""The Triton grouped GEMM (kernels/model/grouped_gemm.py) against a float64 per-group reference and
torch's grouped_mm: values and gradients, odd sizes, empty groups (first, inner, last), fp32 and
bf16; and the choice between the two per device, dtype and GPU architecture, and on the CPU per
dtype, size and trace (dispatch.grouped_mm_path)."""
import pytest
import torch
import torch.nn.functional as F

from fusedrl.kernels import dispatch, grouped_linear, moe_sort
from fusedrl.kernels.model import moe_gemm
from fusedrl.kernels.model.grouped_gemm import BLOCK_M, grouped_gemm
from kernel_testing import DEVICE, check_against_float64, needs_triton


def per_group_reference(offsets):
    """a [R, K], b [E, N, K] -> [R, N]: each group's rows times its weight, one matmul per group
    (the group bounds read on the host: a test's reference)."""
    ends = offsets.tolist()

    def product(a, b):
        starts = [0] + ends[:-1]
        return torch.cat([a[s:e] @ b[g].T for g, (s, e) in enumerate(zip(starts, ends))])
    return product


def offsets_of(sizes):
    return torch.tensor(sizes, device=DEVICE).cumsum(0).to(torch.int32)


# (group sizes, N, K): odd sizes; empty first, inner and last groups; a group spanning tiles and a
# tile spanning many groups; no rows at all.
SHAPES = [([3, 0, 5, 1, 0], 20, 37), ([0, 2 * BLOCK_M + 3, 0, 1], 70, 33), ([1] * 9 + [0], 16, 24),
          ([0, 0, 0], 12, 8)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes,n_out,n_in", SHAPES)
def test_triton_grouped_gemm_matches_float64_per_group_products(sizes, n_out, n_in, dtype):
    offsets = offsets_of(sizes)
    g = torch.Generator(DEVICE).manual_seed(len(sizes) + n_out)
    a = torch.randn(sum(sizes), n_in, generator=g, device=DEVICE).to(dtype)
    b = (torch.randn(len(sizes), n_out, n_in, generator=g, device=DEVICE) / n_in ** 0.5).to(dtype)
    check_against_float64(lambda a, b: grouped_gemm(a, b, offsets), per_group_reference(offsets),
                          (a, b), (0, 1),
                          name=f"grouped_gemm {sizes} {n_out}x{n_in}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_grouped_gemm_equals_grouped_mm_and_its_gradients(dtype):
    """At grouped_mm's sizes (whole 16-byte rows) through grouped_linear, the one entry point: the
    Triton path where dispatch says so, torch's grouped_mm otherwise."""
    ids = torch.randint(0, 5, (11, 2), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ids[ids == 2] = 3  # expert 2 empty
    _, _, offsets = moe_sort(ids, 6)  # expert 5 empty too
    x = torch.randn(22, 48, device=DEVICE).to(dtype)
    w = (torch.randn(6, 32, 48, device=DEVICE) / 7).to(dtype)
    upstream = torch.randn(22, 32, device=DEVICE).to(dtype)
    results = []
    for product in (lambda x, w: grouped_gemm(x, w, offsets),
                    lambda x, w: F.grouped_mm(x, w.transpose(-2, -1), offs=offsets)):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = product(xs, ws)
        out.backward(upstream)
        results.append((out, xs.grad, ws.grad))
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for ours, theirs, name in zip(results[0], results[1], ("out", "grad x", "grad w")):
        torch.testing.assert_close(ours, theirs, **tolerance, msg=name)
    # empty groups: zero gradient
    assert (results[0][2][2] == 0).all() and (results[0][2][5] == 0).all()


@pytest.mark.parametrize("device_type,dtype,capability,path", [
    ("cpu", torch.float32, None, "grouped_mm"),
    ("cpu", torch.bfloat16, None, "grouped_mm"),
    ("cuda", torch.bfloat16, (9, 0), "grouped_mm"),  # H100/H200: the CUTLASS kernel
    ("cuda", torch.bfloat16, (10, 0), "grouped_mm"),  # B200
    # A100: grouped_mm's fallback would read offsets on the host
    ("cuda", torch.bfloat16, (8, 0), "triton"),
    ("cuda", torch.bfloat16, (12, 0), "triton"),
    ("cuda", torch.float32, (9, 0), "triton"),  # fp32 MoE: the fallback at any architecture
    ("cuda", torch.float16, (9, 0), "triton"),
])
def test_the_grouped_gemm_path_per_device_dtype_and_architecture(device_type, dtype, capability,
                                                                 path):
    assert dispatch.grouped_mm_path(device_type, dtype, capability) == path


@pytest.mark.parametrize("device_type,dtype,aligned,compiling,path", [
    # the CPU's grouped_mm: fp32, bf16 and fp16 eagerly, bf16 alone traced (its fake kernel), rows of
    # whole 16 bytes; the loop takes the rest
    ("cpu", torch.float32, True, True, "loop"),
    ("cpu", torch.float16, True, True, "loop"),
    ("cpu", torch.bfloat16, True, True, "grouped_mm"),
    ("cpu", torch.float16, True, False, "grouped_mm"),
    ("cpu", torch.float64, True, False, "loop"),
    ("cpu", torch.float32, False, False, "loop"),
    ("cpu", torch.bfloat16, False, True, "loop"),
    # a GPU's choice reads neither: its grouped_mm path refuses unaligned sizes in one line
    ("cuda", torch.bfloat16, False, True, "grouped_mm"),
    ("cuda", torch.float32, False, True, "triton"),
])
def test_the_cpu_runs_grouped_mm_only_where_it_can(device_type, dtype, aligned, compiling, path):
    capability = (9, 0) if device_type == "cuda" else None
    assert dispatch.grouped_mm_path(device_type, dtype, capability, aligned=aligned, compiling=compiling) == path


# (16, 32): rows of whole 16 bytes; (6, 5): not in any dtype
@pytest.mark.parametrize("dtype,n_out,n_in", [(torch.float32, 16, 32), (torch.float64, 16, 32),
                                              (torch.float32, 6, 5), (torch.bfloat16, 6, 5)])
def test_grouped_linear_on_the_cpu_runs_any_dtype_and_size_eager_and_compiled(dtype, n_out, n_in):
    """torch's CPU grouped_mm refuses fp64, rows not of whole 16 bytes and, traced, anything but
    bf16: grouped_linear runs there all the same (the per-group loop), eager and under
    torch.compile(fullgraph=True), values and gradients as the per-group products."""
    torch._dynamo.reset()
    offsets = torch.tensor([2, 2, 5], dtype=torch.int32)
    g = torch.Generator().manual_seed(n_in)
    x = torch.randn(5, n_in, generator=g).to(dtype)
    w = (torch.randn(3, n_out, n_in, generator=g) / n_in ** 0.5).to(dtype)
    expected = per_group_reference(offsets)(x.double(), w.double())
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    compiled = torch.compile(grouped_linear, fullgraph=True, backend="aot_eager")
    for fn in (grouped_linear, compiled):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(xs, ws, offsets)
        out.float().sum().backward()
        torch.testing.assert_close(out.double(), expected, **tol)
        # d sum / d x: each row's weight summed over the outputs
        rows_expert = torch.tensor([0, 0, 2, 2, 2])
        torch.testing.assert_close(xs.grad.double(), w.double().sum(1)[rows_expert], **tol)


@pytest.mark.parametrize("device_type,capability,path", [
    ("cpu", None, "loop"), ("cuda", (9, 0), "triton"), ("cuda", (8, 0), "triton")])
def test_a_torch_without_grouped_mm_never_takes_its_path(device_type, capability, path):
    assert dispatch.grouped_mm_path(device_type, torch.bfloat16, capability, False) == path


def test_grouped_linear_without_torch_grouped_mm_runs_one_matmul_per_group(monkeypatch):
    """A torch build with no F.grouped_mm (dispatch.TORCH_GROUPED_MM None): on the CPU, grouped_linear
    is the per-group loop, against float64 in values and both gradients, empty groups included."""
    monkeypatch.setattr(dispatch, "TORCH_GROUPED_MM", None)
    offsets = offsets_of([3, 0, 5, 1, 0]).cpu()
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(9, 37, generator=g), torch.randn(5, 20, 37, generator=g) / 6
    assert dispatch.grouped_gemm_path(x) == "loop"
    check_against_float64(lambda x, w: grouped_linear(x, w, offsets), per_group_reference(offsets),
                          (x, w), (0, 1), name="grouped_linear without grouped_mm")


@needs_triton
def test_grouped_linear_takes_the_path_dispatch_names(monkeypatch):
    """grouped_linear runs ours where the path is "triton" (an fp32 model on a GPU, simulated here),
    with no 16-byte rule, and grouped_mm's sizes rule where it is "grouped_mm"."""
    ran = []
    monkeypatch.setattr(moe_gemm, "grouped_gemm",
                        lambda *args: ran.append("triton") or grouped_gemm(*args))
    offsets = offsets_of([2, 0, 3])
    # 24- and 20-byte rows
    x, w = torch.randn(5, 6, device=DEVICE), torch.randn(3, 5, 6, device=DEVICE)
    monkeypatch.setattr(moe_gemm, "grouped_gemm_path", lambda x, w: "triton")
    torch.testing.assert_close(grouped_linear(x, w, offsets), per_group_reference(offsets)(x, w))
    assert ran == ["triton"]
    monkeypatch.setattr(moe_gemm, "grouped_gemm_path", lambda x, w: "grouped_mm")
    with pytest.raises(ValueError, match="grouped_mm needs rows of whole 16 bytes"):
        grouped_linear(x, w, offsets)
