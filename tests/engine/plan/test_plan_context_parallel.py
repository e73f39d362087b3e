"""`fusedrl plan` at train.context_parallel C (engine/parallel/context_parallel.py): a GPU's training
and scoring activations are those of its 1/C of each forward's tokens, with the whole pack's keys and
values its attention reads (C per token, as prefix sharing's gathered keys are counted); weights,
gradients and optimizer state stay FSDP2's 1/N. Qwen2.5-7B shapes on 8 x 80 GB; refusals in one line."""
import pytest

from fusedrl.engine.cli import STAGES
from fusedrl.engine.plan.activations import forward_activations, training_activations
from fusedrl.engine.plan.command import plan_config
from fusedrl.engine.plan.planner import plan_stage, stage_setup
from test_plan_qwen import CKPT, NODE, POOL, plan, plan_table

# Rows read whole at C = 1 too (prefix sharing's auto is on there, off at C > 1): the same tokens.
LONG = ("rollout.max_new_tokens=16384", "rollout.prompts_per_iteration=4", "ppo.minibatch_size=8",
        "ppo.tokens_per_microbatch=16640", "rollout.tokens_per_forward=16640", "train.prefix_sharing=false")


@pytest.fixture(scope="module")
def qwen7b(tmp_path_factory):
    return plan_table.write_config(tmp_path_factory.mktemp("qwen"), "7B")


def test_grpo_activations_are_a_context_rank_s_share(qwen7b):
    one, two = (plan("grpo", qwen7b, CKPT, POOL, *LONG, f"train.context_parallel={c}") for c in (1, 2))
    c = stage_setup(plan_config("grpo", STAGES["grpo"][0], None, [f"policy={qwen7b}", "reward_fn=rewards:score"]),
                    NODE["gpus"]).parts[0].config
    tokens = 16640
    assert one.phases["update"]["activations"] == training_activations(c, 2, True, tokens, lm_head=True)
    assert two.phases["update"]["activations"] == training_activations(c, 2, True, tokens // 2, lm_head=True,
                                                                       shared_keys=2.0)
    assert two.phases["scoring"]["activations"] == forward_activations(c, 2, tokens // 2, lm_head=True,
                                                                       shared_keys=2.0)
    assert two.phases["update"]["activations"] < 0.6 * one.phases["update"]["activations"]
    for phase in ("rollout", "update"):  # the shards are FSDP2's over every GPU, as at C = 1
        for category in ("weights", "optimizer"):
            assert two.phases[phase][category] == one.phases[phase][category]


def test_sft_activations_are_a_context_rank_s_share(qwen7b):
    def sft(c):
        cfg = plan_config("sft", STAGES["sft"][0], None, [f"model={qwen7b}", "data.train_file=x.jsonl",
                                                          "data.tokens_per_batch=32768", "data.max_length=32768",
                                                          f"train.context_parallel={c}",
                                                          "train.gradient_checkpointing=false"])
        return plan_stage(cfg, NODE["gpus"], NODE["gpu_memory"])
    one, four = sft(1), sft(4)
    assert four.phases["update"]["activations"] < 0.35 * one.phases["update"]["activations"]

