"""The traffic counter counts known ops exactly, and the decode-step and PPO-iteration reports run
at tiny shapes with sane fields (bytes, not timings)."""
import pytest
import torch

import traffic_decode
import traffic_ppo
from kernel_testing import needs_interpreter
from fusedrl.bench.traffic_count import TrafficCounter

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8)


def test_matmul_view_and_gather_bytes():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    weight, ids = torch.randn(100, 16), torch.tensor([1, 5, 7])
    with TrafficCounter() as counter:
        a.t()                                   # a view: nothing moves
        a @ b                                   # reads both operands, writes [8, 4]
        torch.nn.functional.embedding(ids, weight)  # reads 3 rows (and the ids), not the table
    read, written = counter.bytes["other"]
    assert read == (8 * 16 + 16 * 4) * 4 + (3 * 16 * 4 + 3 * 8)
    assert written == 8 * 4 * 4 + 3 * 16 * 4


def test_mutated_arguments_count_as_written_once():
    x, y = torch.randn(10), torch.randn(10)
    with TrafficCounter() as counter:
        x.add_(y)                               # returns x: written once, not twice
    assert counter.bytes["other"] == [80, 40]


def test_host_syncs_are_counted():
    x = torch.arange(4)
    with TrafficCounter() as counter, counter.python_syncs():
        x.sum().item()
        x.tolist()
        bool(x[0])
        x.nonzero()
    assert dict(counter.syncs) == {"item/bool": 2, "tolist": 1, "nonzero": 1}


@needs_interpreter
def test_decode_report_sees_each_fused_kernel_as_one_op():
    report = traffic_decode.decode_report(batch=4, layers=1, context=20, top_p=0.9, dtype=torch.float32,
                                          oracles=False, **TINY)
    assert {"embedding", "layer 0", "LM head", "sampler"} <= set(report["regions"])
    assert report["total"]["counted"] >= report["total"]["floor"] > 0
    assert report["host_syncs"] == {"tolist": 1}
    # 5 kernels: norm + q/k/v GEMM, RoPE + store + attention, the o GEMM, norm + gate/up GEMM + SiLU * up,
    # the down GEMM; plus the q/k/v split and 4 views. No op of the torch fallbacks (their norm alone is 6).
    layer = report["regions"]["layer 0"]
    assert (layer["ops"], layer["kernels"]) == (10, 5)
    assert "| layer 0 |" in traffic_decode.decode_table(report)


@needs_interpreter
@pytest.mark.parametrize("batch", [1, 128])
def test_decode_step_launches_at_most_eight_kernels_per_layer_and_six_outside(batch):
    """The decode step's budget, counted (a fused custom op is one kernel): 5 a layer up to 16 rows
    (each norm fused with the projection after it), 8 beyond (the norm kernel, cuBLAS's GEMM and
    SiLU * up apart: faster at 256 rows); embedding, final norm, LM head, sampler and the copy of
    the log-probs into the kept buffer outside the layers; RoPE reads its tables by position inside
    the attention kernel, so the step gathers no cos/sin rows."""
    report = traffic_decode.decode_report(batch=batch, layers=2, context=9, top_p=0.9, dtype=torch.float32,
                                          oracles=True, **TINY)
    kernels = report["kernels"]
    assert kernels["per_layer"] == traffic_decode.kernels_per_layer(batch) == (5 if batch == 1 else 8)
    assert kernels["outside_layers"] == 5 <= traffic_decode.KERNELS_OUTSIDE_LAYERS
    assert kernels["host_to_device_copies"] == 1  # the inputs: one pinned buffer of bytes
    assert report["host_syncs"] == {"tolist": 1}


@needs_interpreter
def test_oracles_leave_the_counted_bytes_unchanged():
    args = dict(batch=3, layers=1, context=18, top_p=0.9, dtype=torch.float32, **TINY)
    interpreted = traffic_decode.decode_report(oracles=False, **args)
    with_oracles = traffic_decode.decode_report(oracles=True, **args)
    assert with_oracles["shape"]["oracles"] == sorted(traffic_decode.ORACLES)
    assert with_oracles["regions"] == interpreted["regions"]


@needs_interpreter
def test_exact_mode_report_counts_both_modes_alike_with_or_without_oracles():
    args = dict(batch=3, context=18, top_p=0.9, dtype=torch.float32, **TINY)
    interpreted = traffic_decode.exact_mode_report(oracles=False, **args)
    with_oracles = traffic_decode.exact_mode_report(oracles=True, **args)
    assert with_oracles["modes"] == interpreted["modes"]
    for mode in ("default", "exact"):
        m = with_oracles["modes"][mode]
        assert m["per_layer"] > 0 and m["rest"] > 0 and m["host_syncs"] == {"tolist": 1}
        assert m["step"] == m["rest"] + 24 * m["per_layer"]
    # the exact step moves more (fp32 logits read twice): more bytes, never fewer
    assert with_oracles["exact_over_default"] > 1
    assert "| exact |" in traffic_decode.exact_mode_table(with_oracles)


TINY_PPO = traffic_ppo.Shape(prompts=2, samples=2, prompt_len=5, new_tokens=3, minibatches=2, micro=1,
                             model=tuple(TINY.items()), layers=1)


@pytest.fixture(scope="module")
def tiny_ppo_report():
    return traffic_ppo.ppo_report(TINY_PPO)


@needs_interpreter
def test_ppo_report_counts_every_phase_against_its_floor(tiny_ppo_report):
    report = tiny_ppo_report
    assert set(report["phases"]) == set(traffic_ppo.PHASES)
    for name, phase in report["phases"].items():
        assert phase["ops"] > 0 and phase["floor"] > 0, name
        assert phase["read"] + phase["written"] >= phase["floor"], name
    assert report["other"] == {"read": 0, "written": 0}
    assert "| update |" in traffic_ppo.ppo_table(report)


@needs_interpreter
def test_ppo_iteration_host_syncs_outside_generation_are_within_minibatches_plus_5(tiny_ppo_report):
    """The host-sync budget, on the GPU's path: the rollout's finite-score check and metrics one read
    each, the epoch's shuffle one, each minibatch's stats one; no sync in scoring or the forwards."""
    report = tiny_ppo_report
    assert report["host_syncs_outside_generation"] <= traffic_ppo.sync_budget(TINY_PPO) == 7, report["host_syncs_by_phase"]
    by_phase = report["host_syncs_by_phase"]
    assert by_phase["update"] == {"tolist": TINY_PPO.minibatches + 1}   # a read per minibatch + the shuffle
    assert not any(by_phase.get(name) for name in ("score", "reference", "old"))
    assert "host syncs outside generation: 5 (budget 7" in traffic_ppo.ppo_table(report)
