"""`fusedrl plan` at train.data_parallel=hybrid (HSDP, several nodes): a GPU holds 1/S of each model,
S the shard group (one node's GPUs, `--gpus-per-node`, unless train.shard_group_size says), however
many nodes hold copies; a shard group that does not divide the GPUs is one line, in the plan and at
a run's start."""
import json

import pytest
import torch

from fusedrl.engine import cli
from fusedrl.engine.errors import ConfigValueError, UsageError
from fusedrl.engine.plan.check import refuse_unfit
from fusedrl.engine.plan.planner import plan_stage
from cli_testing import cli_error
from test_plan_qwen import CKPT, GB, config, plan_table

HYBRID = "train.data_parallel=hybrid"


@pytest.fixture(scope="module")
def qwen_7b(tmp_path_factory):
    return plan_table.write_config(tmp_path_factory.mktemp("qwen"), "7B")


def test_a_gpu_holds_its_shard_group_s_shards_whatever_the_nodes(qwen_7b):
    two_nodes = plan_stage(config("grpo", qwen_7b, CKPT, HYBRID), 16, 80 * GB, gpus_per_node=8)
    one_node = plan_stage(config("grpo", qwen_7b, CKPT), 8, 80 * GB)
    assert two_nodes.shard_group == 8 and two_nodes.phases == one_node.phases
    # Full shard over the 16 GPUs halves the resident shards (FSDP's rows rounded up: 1e-3).
    sixteen = plan_stage(config("grpo", qwen_7b, CKPT), 16, 80 * GB)
    for category in ("weights", "optimizer"):
        assert two_nodes.phases["update"][category] == pytest.approx(2 * sixteen.phases["update"][category], rel=1e-3)
    set_size = plan_stage(config("grpo", qwen_7b, CKPT, HYBRID, "train.shard_group_size=4"), 16, 80 * GB,
                          gpus_per_node=8)
    four = plan_stage(config("grpo", qwen_7b, CKPT), 4, 80 * GB)
    assert set_size.shard_group == 4 and set_size.phases["update"] == four.phases["update"]


def test_the_command_takes_the_gpus_of_a_node(qwen_7b, capsys):
    options = ["plan", "grpo", f"policy={qwen_7b}", "reward_fn=rewards:score", "--gpus", "16", HYBRID]
    assert cli.main([*options, "--gpus-per-node", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shard_group"] == 8
    assert cli.main([*options, "--gpus-per-node", "8"]) == 0
    assert "16 GPU(s) x 80.0 GB, FSDP shard groups of 8, bytes per GPU" in capsys.readouterr().out
    for per_node in ("3", "0"):  # 0 was taken as "all of them"
        assert cli_error([*options, "--gpus-per-node", per_node], capsys) == (
            2, f"fusedrl plan: --gpus-per-node={per_node}: expected a divisor of --gpus=16\n")
    code, err = cli_error([*options, "train.shard_group_size=3"], capsys)
    assert (code, err) == (2, "fusedrl plan: train.shard_group_size=3 with train.data_parallel=hybrid: expected a "
                              "size dividing the 16 ranks (set train.shard_group_size to one)\n")


def test_a_run_refuses_a_shard_group_that_does_not_divide_its_ranks(qwen_7b):
    with pytest.raises(ConfigValueError, match=r"^train.shard_group_size=3 with train.data_parallel=hybrid"):
        refuse_unfit(config("grpo", qwen_7b, HYBRID, "train.shard_group_size=3"), torch.device("cpu"), 4)
    with pytest.raises(UsageError, match="train.shard_group_size=2 is read with train.data_parallel=hybrid only"):
        config("grpo", qwen_7b, "train.shard_group_size=2")
    with pytest.raises(UsageError, match="train.tensor_parallel=2 with train.data_parallel='hybrid': "):
        config("grpo", qwen_7b, HYBRID, "train.tensor_parallel=2")  # the compatibility table's
