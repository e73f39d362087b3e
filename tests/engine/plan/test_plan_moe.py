"""The plan of Qwen3-30B-A3B (config.json alone, random-weight shapes) GRPO on 8 x 80 GB: its
published size (30.53B parameters, every expert counted), does not fit in full today (the load is
sharded, but the rollout gathers the whole 61 GB policy beside its shards and optimizer state), fits
with LoRA on attention, which the advice names."""
import pytest
import transformers

from test_plan_qwen import CKPT, GB, NODE, config, plan
from fusedrl.engine.plan.phases import forward_gathered, model_rows
from fusedrl.engine.plan.planner import stage_setup


@pytest.fixture(scope="module")
def qwen3_30b_a3b(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_30b_a3b")
    transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        dtype="bfloat16").save_pretrained(root)
    return root


def test_qwen3_30b_a3b_grpo_on_one_node_takes_the_advice(qwen3_30b_a3b):
    """In full it does not fit (the rollout gathers the whole policy beside its shards); the advice
    names a change that does. Attention LoRA alone leaves the rollout at ~72 GB, where the
    measured prefill activations (activations.py) leave the auto KV pool no room on 80 GB."""
    policy = model_rows(stage_setup(config("grpo", qwen3_30b_a3b), NODE["gpus"]))[0]
    assert policy["parameters"] / 1e9 == pytest.approx(30.53, abs=0.01)
    full = plan("grpo", qwen3_30b_a3b, CKPT, advise=True)
    assert not full.fits and full.total("rollout") == pytest.approx(124.2 * GB, rel=0.01)
    assert full.total("load") < 16 * GB  # each GPU reads only its shards
    assert any(note.startswith("fits with") for note in full.notes), full.notes
    lora = plan("grpo", qwen3_30b_a3b, CKPT, "lora.rank=64", "lora.target_modules=q_proj,k_proj,v_proj,o_proj")
    assert lora.peak < 73 * GB and lora.peak_phase == "rollout"


def test_expert_parallel_holds_the_experts_of_its_group(qwen3_30b_a3b):
    """train.expert_parallel=E: the policy's experts (28.99B of the 30.53B: 48 layers x 128 experts x
    3 x 768 x 2048) are 1/E per GPU, weights, gradients and optimizer state alike (1/8 as FSDP's share
    at E = 8, twice that in groups of 4), and FSDP's gathered layer does not hold them."""
    experts = 48 * 128 * 3 * 768 * 2048
    plans = {e: plan("grpo", qwen3_30b_a3b, CKPT, f"train.expert_parallel={e}") for e in (1, 4, 8)}
    # bf16 weight + gradient + fp32 master and two moments + the step's fp32 gradient copy
    per_param = {"weights": 2, "grads": 2 + 4, "optimizer": 12}
    for cat, size in per_param.items():
        assert plans[4].phases["update"][cat] - plans[8].phases["update"][cat] == pytest.approx(
            size * experts * (1 / 4 - 1 / 8), rel=1e-3), cat
    assert plans[8].phases["update"]["weights"] == pytest.approx(plans[1].phases["update"]["weights"], rel=1e-6)
    gathered = {e: forward_gathered(setup, setup.parts[0]) for e in (1, 8)
                for setup in [stage_setup(config("grpo", qwen3_30b_a3b, CKPT, f"train.expert_parallel={e}"), 8)]}
    assert gathered[1] - gathered[8] == 2 * 2 * experts / 48  # the current and the prefetched layer's
