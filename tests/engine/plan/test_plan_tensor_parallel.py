"""`fusedrl plan` at train.tensor_parallel T (engine/parallel/tensor_parallel.py): each GPU holds its share of
its tensor slice of every model (1/N sharded over the data groups, 1/T where they hold copies), generation
gathers that slice (sharded) or reads it where it lies (copies, T = N), and the KV pool holds each GPU's share of the heads. On 8 x 80 GB with config.json-only Qwen2.5 shapes, GRPO
with lora.rank=64 at T=8 fits for 32B and 72B with a 16 GB KV pool per GPU (sharded load, sharded
LoRA base, streamed export)."""
import json

import pytest

from fusedrl.engine import cli
from fusedrl.engine.errors import ConfigValueError
from test_plan_qwen import CKPT, GB, config, plan, plan_table


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {size: plan_table.write_config(root, size) for size in ("14B", "32B", "72B")}


@pytest.mark.parametrize("size", ["32B", "72B"])
def test_lora_grpo_fits_the_node_at_tensor_parallel_8_with_a_16gb_kv_pool(qwen, size):
    options = (CKPT, "lora.rank=64", "rollout.kv_cache_memory=16100000000")  # >= 16 GB in whole blocks
    one = plan("grpo", qwen[size], *options)
    eight = plan("grpo", qwen[size], *options, "train.tensor_parallel=8")
    # At T=1 the whole bf16 policy is gathered on every GPU to generate (65.5 GB, 145.4 GB): no fit.
    whole = {"32B": 65.5 * GB, "72B": 145.4 * GB}[size]
    assert not one.fits and one.phases["rollout"]["gathered"] == pytest.approx(whole, rel=0.01)
    assert eight.fits and eight.phases["rollout"]["gathered"] == 0
    assert eight.phases["rollout"]["kv_pool"] >= 16 * GB
    # The weights generation reads per GPU are the resident shard, 2P/8 (and the replicated adapters).
    rows = {row["role"]: row["bytes"] for row in eight.models}
    assert eight.phases["rollout"]["weights"] == pytest.approx(rows["policy"] / 8 + rows["policy adapters"], rel=1e-3)


def test_the_pool_holds_t_times_the_blocks_and_a_smaller_t_shards_or_copies_its_slice(qwen):
    options = (CKPT, f"rollout.kv_cache_memory={GB}", "rollout.prompts_per_iteration=1024")
    one, two, copies = (plan("grpo", qwen["14B"], *options, f"train.tensor_parallel={t}", *more)
                        for t, more in ((1, ()), (2, ()), (2, ("train.data_parallel=replicate",))))
    assert one.phases["rollout"]["kv_pool"] == pytest.approx(GB, rel=0.01)
    assert two.phases["rollout"]["kv_pool"] == pytest.approx(GB, rel=0.01)  # the same bytes, 2x the tokens
    rows = {row["role"]: row["bytes"] for row in two.models}
    # T=2 on 8 GPUs, 4 data groups of 2 tensor ranks. Sharded over the data groups (the default): each
    # GPU keeps 1/8 of every model and of the optimizer state, as at T=1, and gathers the policy's
    # half to generate (T=1: all of it).
    assert two.phases["rollout"]["weights"] == pytest.approx(one.phases["rollout"]["weights"], rel=1e-3)
    assert two.phases["update"]["optimizer"] == pytest.approx(one.phases["update"]["optimizer"], rel=1e-3)
    assert two.phases["rollout"]["gathered"] == pytest.approx(rows["policy"] / 2, rel=1e-3)
    assert one.phases["rollout"]["gathered"] == pytest.approx(rows["policy"], rel=1e-3)
    # With rollout.persistent_weights that half is a buffer kept through the run, gathered into in place.
    kept = plan("grpo", qwen["14B"], *options, "train.tensor_parallel=2", "rollout.persistent_weights=true")
    assert kept.phases["rollout"]["gathered"] == 0
    assert kept.phases["update"]["weights"] == pytest.approx(two.phases["update"]["weights"] + rows["policy"] / 2,
                                                             rel=1e-3)
    # Copied across the data groups (train.data_parallel=replicate): each GPU its half of every model,
    # its optimizer state a half's too; the rollout reads that half as it is, gathering nothing.
    assert copies.phases["rollout"]["gathered"] == 0
    assert copies.phases["rollout"]["weights"] == pytest.approx((rows["policy"] + rows["reference"]) / 2, rel=1e-3)
    assert copies.phases["update"]["optimizer"] == pytest.approx(one.phases["update"]["optimizer"] * 4, rel=1e-3)


def test_a_size_that_does_not_fit_is_one_line_naming_those_that_do(qwen, capsys):
    with pytest.raises(ConfigValueError, match=r"train.tensor_parallel=3: .* these fit: \[1, 2, 4, 8\]$"):
        plan("grpo", qwen["14B"], "train.tensor_parallel=3")
    assert cli.main(["plan", "grpo", f"policy={qwen['14B']}", "reward_fn=rewards:score", "--gpus", "8", "--json",
                     CKPT, "train.tensor_parallel=8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["phases"]["rollout"]["gathered"] == 0


def test_the_offloads_move_the_data_groups_shards_and_copied_slices_are_not_offered_them(qwen):
    """32B GRPO at T=4 on 8 x 80 GB: its slices sharded over 2 data groups do not fit until the
    optimizer state goes to CPU memory, which the advice offers; at T=8 (copies: nothing to offload)
    it is not offered."""
    four = plan("grpo", qwen["32B"], CKPT, "train.tensor_parallel=4", advise=True)
    assert not four.fits and any("train.optimizer_offload=true" in note for note in four.notes)
    offloaded = plan("grpo", qwen["32B"], CKPT, "train.tensor_parallel=4", "train.optimizer_offload=true")
    assert offloaded.fits and offloaded.phases["update"].get("optimizer", 0) == 0
    assert offloaded.host_optimizer_bytes == pytest.approx(four.phases["update"]["optimizer"], rel=1e-3)
    eight = plan("grpo", qwen["32B"], CKPT, "train.tensor_parallel=8", advise=True)
    assert not eight.fits and not any("optimizer_offload" in note for note in eight.notes)
