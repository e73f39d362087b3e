"""The launch report's budgets, counted live at tiny shapes: the optimizer step <= 12 kernels and
no host sync for 300 tensors; a decoder layer's training forward + backward on the fused kernels
<= 30 (four GEMMs each way: q/k/v and gate/up packed)."""
import pytest

import launches
from kernel_testing import needs_interpreter


def test_optimizer_step_is_at_most_12_kernels_without_a_host_sync_for_300_tensors():
    counter = launches.optimizer_launches(300)
    assert counter.total <= launches.BUDGETS["optimizer_step"], dict(counter.launches)
    assert sum(counter.syncs.values()) == 0, dict(counter.syncs)
    assert counter.total == launches.optimizer_launches(30).total   # whatever the number of tensors


@needs_interpreter  # the model's CPU tensors through the Triton kernels: counted where they run
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_decoder_layer_training_launches_meet_the_30_kernel_budget(arch):
    fused = launches.per_layer(arch, "triton")
    eager = launches.per_layer(arch, "torch")
    assert fused["launches"] <= launches.BUDGETS["layer_fwd_bwd"], fused
    assert eager["launches"] > 2 * fused["launches"], (fused, eager)
    assert fused["by_op"]["fusedrl::rope"] == fused["by_op"]["fusedrl::rope_bwd"] == 1   # q and k in one launch
    # The four projections: one GEMM each forward, two each backward (input and weight gradients).
    assert fused["by_op"].get("aten::mm", 0) + fused["by_op"].get("aten::addmm", 0) == 12, fused


def test_the_ranking_loss_launches_as_much_for_66_rankings_as_for_2_without_a_host_sync():
    """Every pair of a micro-batch at once: a loop over the rankings launched ~19 kernels each."""
    counts = {name: launches.ranking_loss_launches(sizes) for name, sizes in launches.RANKINGS.items()}
    assert counts["66 rankings"] == counts["2 rankings"], counts
    assert counts["2 rankings"]["launches"] <= launches.BUDGETS["ranking_loss"], counts
    assert not counts["2 rankings"]["syncs"], counts


@needs_interpreter  # the model's CPU tensors through the Triton kernels: counted where they run
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sft_and_rm_steps_read_the_host_once(stage):
    """The step's stats, loss and gradient norm stay on the device and are read together: one host
    sync per optimizer step of two micro-batches (it was two per micro-batch plus two per step)."""
    syncs = launches.supervised_step_syncs(stage)
    assert sum(syncs.values()) == launches.BUDGETS["supervised_step_syncs"] == 1, syncs


@needs_interpreter  # the model's CPU tensors through the Triton kernels: counted where they run
def test_moe_block_decode_has_no_host_sync_and_a_fixed_launch_count():
    """What a decode graph would capture of an MoE layer: router, sort, permute, two grouped GEMMs,
    SiLU * up and the weighted unpermute, with no host read (the group sizes stay on the device)."""
    counter = launches.moe_block_decode()
    assert sum(counter.syncs.values()) == 0, dict(counter.syncs)
    assert counter.total <= launches.BUDGETS["moe_block_decode"], dict(counter.launches)
    assert counter.launches["aten::_grouped_mm"] == 2 and counter.launches["fusedrl::moe_combine"] == 1


@needs_interpreter  # the model's CPU tensors through the Triton kernels: counted where they run
def test_moe_layer_training_runs_the_experts_as_six_grouped_gemms():
    moe, dense = launches.per_layer("qwen3_moe", "triton"), launches.per_layer("qwen3", "triton")
    assert moe["by_op"]["aten::_grouped_mm"] == 6, moe  # gate/up and down, each: forward, input and weight grads
    assert moe["launches"] <= launches.BUDGETS["moe_layer_fwd_bwd"], moe
    # the router's renormalized top k as a k-wide softmax: no division, no sum of the k
    assert "aten::div.Tensor" not in moe["by_op"] and "aten::sum.dim_IntList" not in moe["by_op"], moe
    assert moe["syncs"] == dense["syncs"], (moe, dense)  # none added by the MoE layer
