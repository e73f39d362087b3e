"""moe_sort, moe_permute, moe_unpermute and grouped_linear against float64 references: empty
experts, one token, fp32 and bf16, values and gradients."""
import pytest
import torch

from fusedrl.kernels import grouped_linear, moe_permute, moe_sort, moe_unpermute, reference, use_backend
from fusedrl.kernels.dispatch import grouped_gemm_path
from kernel_testing import DEVICE, check_against_float64, needs_triton

pytestmark = needs_triton


def routing(tokens, top_k, num_experts, seed=0):
    """Distinct experts per token drawn from the first half only: the other half stays empty."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(max(num_experts // 2, top_k), generator=g)[:top_k] for _ in range(tokens)]
    return (torch.stack(rows) if rows else torch.zeros(0, top_k, dtype=torch.int64)).to(DEVICE)


def fused(op):
    def run(*args):
        with use_backend("triton"):
            return op(*args)
    return run


def test_sort_groups_slots_by_expert_and_inverts():
    ids = torch.tensor([[3, 0], [0, 2], [3, 2]], device=DEVICE)
    order, slot_rows, offsets = moe_sort(ids, 5)
    assert order.tolist() == [1, 2, 3, 5, 0, 4]  # expert 0: slots 1, 2; 2: 3, 5; 3: 0, 4
    assert offsets.tolist() == [2, 2, 4, 6, 6]  # experts 1 and 4 empty
    assert slot_rows[order].tolist() == list(range(6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,top_k,hidden", [(1, 2, 64), (13, 2, 1100), (6, 3, 40), (0, 2, 32)])
def test_permute_and_unpermute_match_float64(tokens, top_k, hidden, dtype):
    order, slot_rows, _ = moe_sort(routing(tokens, top_k, 8), 8)
    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    check_against_float64(fused(lambda x: moe_permute(x, order, top_k)),
                          lambda x: reference.moe_permute(x, order, top_k), (x,), (0,), name="moe_permute")
    y = torch.randn(tokens * top_k, hidden, device=DEVICE).to(dtype)
    weights = torch.rand(tokens, top_k, device=DEVICE)
    check_against_float64(fused(lambda y, w: moe_unpermute(y, order, slot_rows, w)),
                          lambda y, w: reference.moe_unpermute(y, slot_rows, w), (y, weights), (0, 1),
                          name="moe_unpermute")


def test_grouped_linear_matches_per_expert_float64_matmuls():
    ids = routing(9, 2, 6, seed=3)
    order, _, offsets = moe_sort(ids, 6)
    x = torch.randn(18, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(6, 12, 24, device=DEVICE, requires_grad=True)
    y = grouped_linear(x, w, offsets)
    expert_of_row = ids.reshape(-1)[order]
    expected = torch.einsum("rk,rok->ro", x.double(), w.double()[expert_of_row])
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    y.sum().backward()  # an expanded gradient: grouped_linear makes it contiguous
    # d sum / d w[e][o] is the sum of group e's rows, the same for every output o
    row_sums = torch.zeros(6, 24, dtype=torch.float64, device=DEVICE).index_add_(0, expert_of_row,
                                                                                 x.detach().double())
    torch.testing.assert_close(w.grad.double(), row_sums[:, None, :].expand(6, 12, 24), atol=1e-5, rtol=1e-5)
    assert (w.grad[3:] == 0).all()  # experts 3..5 got no rows


def test_bad_indices_name_themselves():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"moe_permute: order is torch.int32 \(8,\) on cpu: expected int64"):
        moe_permute(x, torch.zeros(8, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"moe_unpermute: weights \(4, 3\)"):
        moe_unpermute(torch.randn(8, 8), torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.int64),
                      torch.rand(4, 3))
    with pytest.raises(ValueError, match="grouped_linear: offsets is torch.int64"):
        grouped_linear(x, torch.randn(2, 4, 8, device=DEVICE), torch.tensor([2, 4], device=DEVICE))
    with pytest.raises(ValueError, match="grouped_linear: weight is on meta: expected x's device"):
        grouped_linear(x, torch.randn(2, 4, 8, device="meta"), torch.tensor([2, 4], dtype=torch.int32))
    w = torch.randn(2, 3, 8, device=DEVICE)  # 12-byte output rows
    if grouped_gemm_path(x, w) == "grouped_mm":  # torch's grouped GEMM's own rule (not the kernel's): a GPU's
        with pytest.raises(ValueError, match="grouped_linear: weight \\(2, 3, 8\\) in torch.float32: .* 16 bytes"):
            grouped_linear(x, w, torch.tensor([2, 4], dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("ids, match", [
    ([[0, 5], [1, 2]], r"moe_sort: expert_ids must be in \[0, 5\) \(num_experts\); got 1 out of range \(first: 5\)"),
    ([[0, -1], [7, 2]], r"moe_sort: expert_ids must be in \[0, 5\).*got 2 out of range \(first: -1\)"),
])
def test_expert_ids_past_the_experts_are_refused(ids, match, monkeypatch):
    monkeypatch.setenv("FUSEDRL_SYNC_CHECKS", "1")  # the ids are read on a GPU too
    # An id >= num_experts sorts after the last group's end: its slot would silently get no expert.
    with pytest.raises(ValueError, match=match):
        moe_sort(torch.tensor(ids, device=DEVICE), 5)
    with pytest.raises(ValueError, match=r"moe_sort: num_experts must be an int >= 1, got 0"):
        moe_sort(torch.zeros(2, 2, dtype=torch.int64, device=DEVICE), 0)


@pytest.mark.parametrize("ends, match", [
    ([3, 2, 5], r"grouped_linear: offsets must be non-decreasing group end rows >= 0, got offsets\[1\]=2 after 3"),
    ([-1, 2, 5], r"grouped_linear: offsets must be non-decreasing group end rows >= 0, got offsets\[0\]=-1"),
    ([2, 3, 4], r"grouped_linear: offsets\[-1\] must equal x's rows R=5 \(every row in a group\), got 4"),
    ([2, 3, 6], r"grouped_linear: offsets\[-1\] must equal x's rows R=5 .*got 6"),
])
def test_offsets_that_are_not_group_ends_are_refused(ends, match, monkeypatch):
    monkeypatch.setenv("FUSEDRL_SYNC_CHECKS", "1")  # the offsets are read on a GPU too
    x, w = torch.randn(5, 16, device=DEVICE), torch.randn(3, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        grouped_linear(x, w, torch.tensor(ends, dtype=torch.int32, device=DEVICE))
