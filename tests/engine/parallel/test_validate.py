"""engine/parallel/validate.py: the parallel option combinations refused in one line, from the
Python API, the stages' start-up check and `fusedrl plan` alike."""
import pytest
import torch

from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig, RolloutConfig
from fusedrl.engine.config.train import DataConfig, RMConfig, TrainConfig
from fusedrl.engine.errors import UsageError
from fusedrl.engine.parallel.validate import validate
from fusedrl.engine.plan.check import refuse_unfit
from cli_testing import cli_error


def grpo(**train):
    return GRPOConfig(policy="p", prompts_file="f", output_dir="o",
                      train=LoopConfig(device="cpu", **train))


@pytest.mark.parametrize("train, gpus, message", [
    ({"optimizer_offload": True}, 1, r"^train.optimizer_offload=true offloads FSDP2's sharded"),
    ({"tensor_parallel": 2, "optimizer_offload": True}, 2,
     r"^train.optimizer_offload=true with train.tensor_parallel=2 on 2 GPUs"),
    ({"context_parallel": 3}, 4, r"^train.context_parallel=3: expected a divisor of the world size 4 "),
    ({"context_parallel": 2, "tensor_parallel": 4}, 4,
     r"^train.context_parallel=2: expected a divisor of the world size 4 \(C x train.tensor_parallel=4 ranks a "),
])
def test_sizes_the_ranks_do_not_take_are_refused_in_one_line(train, gpus, message):
    cfg = grpo(**train)
    with pytest.raises(UsageError, match=message):
        validate(cfg.parallel_job(), gpus)
    with pytest.raises(UsageError, match=message):
        refuse_unfit(cfg, torch.device("cpu"), gpus)


@pytest.mark.parametrize("train, message", [
    ({"tensor_parallel": 2, "data_parallel": "hybrid"},
     r"^train.tensor_parallel=2 with train.data_parallel='hybrid': not supported \("),
    ({"context_parallel": 2, "prefix_sharing": True},
     r"^train.context_parallel=2 with train.prefix_sharing=True: not supported \(.*\); set one of them off$"),
])
def test_pairs_are_the_compatibility_tables_when_built_and_at_the_start(train, message):
    """A pair of parallel options is refused by the config when it is built, and by validate when
    it was set in place since (the same line)."""
    with pytest.raises(UsageError, match=message):
        grpo(**train)
    cfg = grpo()
    cfg.train = LoopConfig(device="cpu", **train)  # set in place: no check ran
    for check in (lambda: validate(cfg.parallel_job(), 4), lambda: refuse_unfit(cfg, torch.device("cpu"), 4)):
        with pytest.raises(UsageError, match=message):
            check()


def test_lora_dropout_at_tensor_parallel_is_refused_by_the_table():
    cfg = grpo(tensor_parallel=2)
    cfg.lora = LoRAConfig(rank=4, dropout=0.1)
    with pytest.raises(UsageError, match=r"^train.tensor_parallel=2 with lora.dropout=0.1: not "):
        validate(cfg.parallel_job(), 4)
    cfg.lora = LoRAConfig(rank=4)
    validate(cfg.parallel_job(), 4)


def test_the_plan_refuses_what_the_run_would(qwen2_dir, capsys):
    code, err = cli_error(["plan", "grpo", f"policy={qwen2_dir}", "--gpus", "1",
                           "rollout.persistent_weights=true"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("fusedrl plan: rollout.persistent_weights=true keeps a gathered copy")
    cfg = grpo()
    cfg.rollout = RolloutConfig(persistent_weights=True)
    validate(cfg.parallel_job(), 2)  # FSDP2's shards are gathered: kept


def test_context_parallel_refuses_the_reward_model_stage_and_lora_beside_slices():
    rm = RMConfig(model="m", output_dir="o", data=DataConfig(train_file="f", format="pairwise"),
                  train=TrainConfig(device="cpu", context_parallel=2))
    with pytest.raises(UsageError, match=r"^train.context_parallel=2: only SFT, PPO and GRPO train context-parallel$"):
        validate(rm.parallel_job(), 2)
    cfg = grpo(context_parallel=2, tensor_parallel=2)
    cfg.lora = LoRAConfig(rank=4)
    with pytest.raises(UsageError, match=r"^train.context_parallel=2 with lora.rank=4 beside "
                                         r"train.tensor_parallel=2: not supported \("):
        validate(cfg.parallel_job(), 4)


def test_the_plan_refuses_a_context_size_that_does_not_divide_the_gpus(qwen2_dir, capsys):
    code, err = cli_error(["plan", "grpo", f"policy={qwen2_dir}", "--gpus", "4", "train.context_parallel=3"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("fusedrl plan: train.context_parallel=3: expected a divisor of the world size 4")


def test_context_parallel_beside_a_mixture_of_experts_model_is_the_tables_pair(tmp_path):
    """The model's config is read at the start: an MoE model beside context groups is the table's
    pair, named in one line."""
    from moe_testing import make_moe_model
    from train_testing import sft_config
    make_moe_model("qwen3_moe").save_pretrained(tmp_path / "moe")
    cfg = sft_config(tmp_path / "moe", tmp_path / "train.jsonl", tmp_path / "out", train={"context_parallel": 2})
    with pytest.raises(UsageError, match=r"^train.context_parallel=2 with a mixture-of-experts model: not supported "
                                         r"\(its router losses are per forward\); set one of them off$"):
        validate(cfg.parallel_job(), 2)
