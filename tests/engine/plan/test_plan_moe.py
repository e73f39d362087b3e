"""The plan of Qwen3-30B-A3B (config.json alone, random-weight shapes) GRPO on 8 x 80 GB: its
published size (30.53B parameters, every expert counted), does not fit in full today (the load is
sharded, but the rollout gathers the whole 61 GB policy beside its shards and optimizer state), fits
with LoRA on attention, which the advice names."""
import pytest
import transformers

from test_plan_qwen import CKPT, GB, NODE, config, plan
from fusedrl.engine.plan.phases import model_rows
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


def test_qwen3_30b_a3b_grpo_fits_on_one_node_with_attention_lora(qwen3_30b_a3b):
    policy = model_rows(stage_setup(config("grpo", qwen3_30b_a3b), NODE["gpus"]))[0]
    assert policy["parameters"] / 1e9 == pytest.approx(30.53, abs=0.01)
    full = plan("grpo", qwen3_30b_a3b, CKPT, advise=True)
    assert not full.fits and full.total("rollout") == pytest.approx(124.2 * GB, rel=0.01)
    assert full.total("load") < 16 * GB  # each GPU reads only its shards
    assert any("lora.target_modules=q_proj,k_proj,v_proj,o_proj" in note for note in full.notes)
    lora = plan("grpo", qwen3_30b_a3b, CKPT, "lora.rank=64", "lora.target_modules=q_proj,k_proj,v_proj,o_proj")
    assert lora.fits and lora.peak < 72 * GB
