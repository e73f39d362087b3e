"""`fusedrl plan` of a vision-language policy: the tower's weights are the policy's (and the
reference's), trained only with train.train_vision, whole on every tensor rank, and its
activations are in the phases."""
import pytest

from fusedrl.engine.cli import STAGES
from fusedrl.engine.demos.vision import build_vision_model
from fusedrl.engine.demos.vision_task import build_vision_processor
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.plan.command import plan_config
from fusedrl.engine.plan.phases import model_rows
from fusedrl.engine.plan.planner import plan_stage, stage_setup


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return build_vision_model(tmp_path_factory.mktemp("vlm") / "m", 0, build_vision_processor())


def _config(model_dir, *overrides):
    return plan_config("grpo", STAGES["grpo"][0], None,
                       [f"policy={model_dir}", "reward_fn=rewards:score",
                        "rollout.kv_cache_memory=1048576", *overrides])


def test_the_plan_counts_the_vision_tower(vlm):
    model = load_model(vlm)
    tower = sum(p.numel() for p in model.visual.parameters())
    everything = sum(p.numel() for p in model.parameters())
    assert tower > 0
    frozen = {r["role"]: r for r in model_rows(stage_setup(_config(vlm), 1))}
    assert frozen["policy"]["parameters"] == frozen["reference"]["parameters"] == everything
    assert frozen["policy"]["trained_parameters"] == everything - tower
    trained = {r["role"]: r for r in model_rows(stage_setup(
        _config(vlm, "train.train_vision=true"), 1))}
    assert trained["policy"]["trained_parameters"] == everything
    lean, full = (plan_stage(_config(vlm, *o), 1, 80 * 10**9, device="cpu")
                  for o in ((), ("train.train_vision=true",)))
    assert full.phases["update"]["activations"] > lean.phases["update"]["activations"]


def test_the_tower_is_whole_on_every_tensor_rank(vlm):
    """At train.tensor_parallel=2 the decoder's weights are halved, the tower's are not (copies
    across 2 tensor ranks; halved again only where 2 data groups shard them, on 4 GPUs)."""
    setup = stage_setup(_config(vlm, "train.tensor_parallel=2"), 2)
    policy = next(part for part in setup.parts if part.role == "policy")
    params = dict(policy.module.named_parameters())
    tower, layer = params["visual.blocks.0.mlp.gate_proj.weight"], params[
        "model.layers.0.mlp.gate_up_proj.weight"]
    assert setup.local_numel(tower, setup.shards(policy)) == tower.numel()
    assert setup.local_numel(layer, setup.shards(policy)) == layer.numel() // 2
    sharded = stage_setup(_config(vlm, "train.tensor_parallel=2", "train.data_parallel=shard"), 4)
    policy = next(part for part in sharded.parts if part.role == "policy")
    tower = dict(policy.module.named_parameters())["visual.blocks.0.mlp.gate_proj.weight"]
    assert sharded.local_numel(tower, sharded.shards(policy)) == tower.numel() // 2


def test_the_plan_counts_the_critics_tower_as_frozen(vlm):
    """PPO's separate critic built from a vision policy holds the tower too (a vision value model),
    trained only with train.train_vision, as the policy's."""
    model = load_model(vlm)
    tower = sum(p.numel() for p in model.visual.parameters())
    everything = sum(p.numel() for p in model.parameters()) + model.config.hidden_size
    config = plan_config("ppo", STAGES["ppo"][0], None,
                         [f"policy={vlm}", "reward_fn=rewards:score", "critic=separate",
                          "rollout.kv_cache_memory=1048576"])
    critic = {r["role"]: r for r in model_rows(stage_setup(config, 1))}["critic"]
    # the value head [1, H] beside the decoder and the tower; the LM head takes no gradient
    assert critic["parameters"] == everything
    assert critic["trained_parameters"] == everything - tower - model.lm_head.weight.numel()
