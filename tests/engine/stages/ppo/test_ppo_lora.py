"""PPO and GRPO with LoRA: one copy of the policy's weights (the reference is the adapters switched
off), the reference's log-probs are the base model's, only the adapters move, resume is exact."""
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.peft_io import WEIGHTS_FILE
from fusedrl.engine.stages.ppo.forwards import policy_forward, reference_logprobs, response_logprobs
from fusedrl.engine.stages.rollout.build import build_models, build_optimizers
from fusedrl.engine.stages.ppo.update import UpdateSettings, ppo_update
from engine_testing import random_prompts
from train_testing import checkpoint_data
from engine_testing import rewards_in_thread
from test_ppo import config, rollout_of, run_straight_and_resumed, setup, vowel_fraction  # noqa: F401 (fixture)

LORA = LoRAConfig(rank=4, alpha=8.0)


def models_of(cfg, policy_dir):
    return build_models(cfg, torch.device("cpu"), torch.float32, AutoTokenizer.from_pretrained(policy_dir),
                        rewards_in_thread(vowel_fraction))


def resident_parameter_bytes(*modules) -> int:
    """Bytes of the distinct parameter storages the modules hold (a shared tensor counts once)."""
    storages = {}
    for module in modules:
        for p in module.parameters() if module is not None else ():
            storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(storages.values())


def test_lora_ppo_holds_one_copy_of_the_policy_weights(setup):
    root, policy_dir, prompts = setup
    full = models_of(config(root, policy_dir, prompts, "full"), policy_dir)
    tuned = models_of(config(root, policy_dir, prompts, "lora", lora=LORA), policy_dir)
    policy_bytes = resident_parameter_bytes(full.policy)
    adapter_bytes = resident_parameter_bytes(tuned.lora)
    head_bytes = resident_parameter_bytes(tuned.value_head)
    assert resident_parameter_bytes(full.policy, full.reference, full.value_head) == 2 * policy_bytes + head_bytes
    assert tuned.reference is None and tuned.actor.llm.model is tuned.policy
    assert resident_parameter_bytes(tuned.policy, tuned.reference, tuned.value_head, tuned.lora) == \
        policy_bytes + adapter_bytes + head_bytes
    assert adapter_bytes < 0.1 * policy_bytes
    opts, _ = build_optimizers(tuned, config(root, policy_dir, prompts, "lora", lora=LORA))
    trained = {id(p) for group in opts.policy.param_groups for p in group["params"]}
    assert trained == {id(p) for p in [*tuned.lora.parameters(), *tuned.value_head.parameters()]}


def test_the_reference_is_the_base_model_while_the_adapters_train(setup):
    root, policy_dir, prompts = setup
    cfg = config(root, policy_dir, prompts, "reference", lora=LORA)
    models = models_of(cfg, policy_dir)
    opts, _ = build_optimizers(models, cfg)
    frozen = {k: v.clone() for k, v in models.policy.state_dict().items()}
    for seed in range(2):
        rollout, metrics = rollout_of(models, random_prompts([4, 6], seed=seed), cfg, 0.05, seed=seed)
        # The paged decode applies the adapters too: the sampler's log-probs are the training forward's.
        assert metrics["logprob_mismatch_max"] < 1e-4
        assert ppo_update(models, opts, rollout, UpdateSettings.of(cfg), seed=seed).updates > 0
    assert all(torch.equal(v, models.policy.state_dict()[k]) for k, v in frozen.items())
    base = load_model(policy_dir, dtype="float32")
    with torch.no_grad():
        expected = response_logprobs(base, rollout.packed, cfg.rollout.temperature)[0]
        tuned = policy_forward(models, rollout.packed, cfg.rollout.temperature, with_entropy=False)[0]
    assert torch.equal(reference_logprobs(models, rollout.packed, cfg.rollout.temperature), expected)
    assert (tuned - expected)[rollout.mask].abs().max() > 1e-4  # the adapters did move the policy
    assert models.lora.enabled  # switched back on after the reference forward


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_lora_runs_resume_exactly(setup, algo):
    root, policy_dir, prompts = setup
    loop = LoopConfig(iterations=2, save_every=1, keep_checkpoints=0, progress=False, device="cpu")
    lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, target_modules="q_proj,k_proj,v_proj,gate_proj,up_proj")

    def make_config(run):
        if algo == "ppo":
            return config(root, policy_dir, prompts, run, train=loop, lora=lora)
        return GRPOConfig(policy=str(policy_dir), prompts_file=str(prompts), output_dir=str(root / run),
                          reward_fn="reward_testing:vowel_fraction", train=loop, lora=lora,
                          rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3, max_new_tokens=6,
                                                kv_cache_memory=1 << 22),
                          ppo=UpdateConfig(estimator="grpo", epochs=1, minibatch_size=3, vf_coef=0.0,
                                           kl_loss_coef=0.01))
    a, b = run_straight_and_resumed(root, make_config, f"lora-{algo}")
    assert all(torch.equal(a[k], b[k]) for k in a)
    adapters = [load_file(root / f"{kind}-lora-{algo}" / "final_adapter" / WEIGHTS_FILE)
                for kind in ("straight", "resumed")]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    checkpoint = root / f"straight-lora-{algo}" / "checkpoints" / "step-00000002"
    assert checkpoint_data(checkpoint)["models"] == ["policy_adapter"]  # the adapters, not the policy
    base = load_model(policy_dir).state_dict()
    assert not all(torch.equal(base[k], a[k]) for k in base)  # final/ holds the adapters merged in


def test_lora_dropout_with_the_exact_rollout_is_refused(setup):
    root, policy_dir, prompts = setup
    with pytest.raises(ValueError, match="rollout.exact=True with lora.dropout=0.1: not supported"):
        config(root, policy_dir, prompts, "exact", lora=LoRAConfig(rank=4, dropout=0.1),
               rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3, max_new_tokens=6,
                                     kv_cache_memory=1 << 22, exact=True))
