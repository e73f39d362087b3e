"""The plan's parameter, gradient and optimizer bytes equal what a real run allocates: the stage's
real models and optimizers built on the CPU (bf16, as a GPU run's bf16-mixed), one real forward,
backward and optimizer step, and every byte counted; the KV pool is the actor's own."""
import pytest
import torch
from transformers import AutoTokenizer

from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.config.ppo import LoopConfig, PPOConfig, RolloutConfig
from fusedrl.engine.data.packing import pack_sequences
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.reward_model import reward_model_from_lm, save_reward_model
from fusedrl.engine.plan import phases
from fusedrl.engine.plan.planner import stage_setup
from fusedrl.engine.stages.ppo.forwards import policy_forward
from fusedrl.engine.stages.rollout.build import build_models, build_optimizers
from fusedrl.engine.stages.rm import rm_counts, rm_loss
from fusedrl.engine.stages.sft import sft_loss
from fusedrl.engine.train import adapters, optim
from engine_testing import rewards_in_thread
from train_testing import rm_config, save_tiny_model, sft_config

LORA = {"rank": 4, "alpha": 8.0, "target_modules": "q_proj,v_proj,gate_proj,down_proj"}
BF16 = {"device": "cpu", "precision": "bf16-mixed"}
PROMPTS = [([10, 11, 12], [20, 21, 22, 23]), ([13, 14], [24, 25, 26])]


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (a tied weight once)."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def params_of(*modules):
    return [p for m in modules if m is not None for p in m.parameters()]


def optimizer_state_bytes(*optimizers) -> int:
    return tensor_bytes(t for o in optimizers if o is not None for s in o.state.values() for t in s.values()
                        if isinstance(t, torch.Tensor))


def grads_of(*optimizers):
    return [p.grad for o in optimizers if o is not None for g in o.param_groups for p in g["params"]
            if p.grad is not None]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """An untied llama (its LM head is a parameter of its own) and a tied qwen2, with a reward
    model from the llama's weights, and a prompts file."""
    root = tmp_path_factory.mktemp("plan")
    untied = save_tiny_model(root / "untied", arch="llama2")
    tied = save_tiny_model(root / "tied", arch="qwen2")
    save_reward_model(reward_model_from_lm(load_model(untied)), root / "rm", source_dir=untied)
    (root / "data.jsonl").write_text('{"prompt": "hello world"}\n')
    return root


def assert_plan_counts(setup, weights, grads, optimizers):
    assert phases.weight_bytes(setup) == tensor_bytes(weights)
    assert phases.grad_bytes(setup) == tensor_bytes(grads(*optimizers))
    assert phases.optimizer_bytes(setup) == optimizer_state_bytes(*optimizers) > 0


@pytest.mark.parametrize("arch", ["untied", "tied"])
@pytest.mark.parametrize("lora", [False, True])
def test_sft_plan_equals_a_real_step(dirs, arch, lora):
    cfg = sft_config(dirs / arch, dirs / "data.jsonl", dirs / "out", train=BF16,
                     **({"lora": LoRAConfig(**LORA)} if lora else {}))
    model = load_model(cfg.model, dtype=torch.bfloat16)
    adapted = adapters.attach(model, cfg.lora)
    optimizer = optim.build_optimizer(model if adapted is None else adapted, cfg.optim)
    batch = pack_sequences([(p, r, True) for p, r in PROMPTS])
    loss = sft_loss(model, batch, {"tokens": batch.num_targets})[0]
    loss.backward()
    optim.clip_and_step([optimizer], 1.0, loss.detach())
    assert_plan_counts(stage_setup(cfg, 1), params_of(model, adapted), grads_of, [optimizer])


@pytest.mark.parametrize("lora", [False, True])
def test_rm_plan_equals_a_real_step(dirs, lora):
    """The reward model's untied LM head gets no gradient (beta_rm=0): no optimizer state for it."""
    cfg = rm_config(dirs / "untied", dirs / "data.jsonl", dirs / "out", train=BF16,
                    **({"lora": LoRAConfig(**LORA)} if lora else {}))
    model = reward_model_from_lm(load_model(cfg.model, dtype=torch.bfloat16))
    adapted = adapters.attach(model, cfg.lora, {"score": model.score})
    optimizer = optim.build_optimizer(model if adapted is None else adapted, cfg.optim)
    batch = pack_sequences([(PROMPTS[0][0], r, False) for _, r in PROMPTS], group_sizes=[2])
    loss = rm_loss(model, batch, rm_counts(batch), 0.0)[0]
    loss.backward()
    optim.clip_and_step([optimizer], 1.0, loss.detach())
    assert model.lm_head.weight.grad is None
    assert_plan_counts(stage_setup(cfg, 1), params_of(model, adapted), grads_of, [optimizer])


def ppo_config(dirs, **fields) -> PPOConfig:
    return PPOConfig(policy=str(dirs / "untied"), prompts_file=str(dirs / "data.jsonl"), output_dir=str(dirs / "ppo"),
                     rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=2, max_new_tokens=6,
                                           kv_cache_memory=1 << 16),
                     train=LoopConfig(**BF16), **fields)


PPO_CASES = {
    "separate critic": dict(reward_model="RM", critic="separate"),
    "shared value head": dict(reward_fn="m:f", critic="shared"),
    "grpo": dict(reward_fn="m:f", critic="none", ppo={"estimator": "grpo"}),
    "lora policy, lora critic on the reward model": dict(reward_model="RM", critic="separate",
                                                         lora=LORA, critic_lora=LORA),
    "lora critic on a copy of the policy": dict(reward_fn="m:f", critic="separate", critic_lora=LORA),
}


@pytest.mark.parametrize("case", PPO_CASES)
def test_ppo_plan_equals_the_built_models_and_a_real_step(dirs, case):
    from fusedrl.engine.config import io as config_io
    fields = {k: str(dirs / "rm") if v == "RM" else v for k, v in PPO_CASES[case].items()}
    base = config_io.to_dict(ppo_config(dirs))
    cfg = config_io.from_dict(PPOConfig, {**base, **fields, "ppo": {**base["ppo"], **fields.get("ppo", {})}})
    zero = lambda prompts, responses: [0.0] * len(responses)  # noqa: E731
    reward = rewards_in_thread(zero) if cfg.reward_fn else None
    models = build_models(cfg, torch.device("cpu"), torch.bfloat16, AutoTokenizer.from_pretrained(cfg.policy), reward)
    opts, _ = build_optimizers(models, cfg)
    # What the update's forward touches: the policy (its value head) and the critic, on a packed rollout.
    packed = pack_sequences([(p, r, True) for p, r in PROMPTS], width=4)
    logp, _, values = policy_forward(models, packed, 1.0, with_entropy=False)
    loss = logp.sum() + (values.sum() if values is not None else 0.0)
    loss.backward()
    opts.clip_and_step(loss.detach())
    rm = getattr(models.score, "rm", None)
    trunk = getattr(models.critic, "trunk", None)
    weights = params_of(models.policy, models.reference, rm, models.critic, trunk, models.value_head, models.lora)
    setup = stage_setup(cfg, 1)
    assert_plan_counts(setup, weights, grads_of, opts.all())
    assert phases.plan_phases(setup)[1].bytes == models.actor.kv_pool_bytes
