"""PPO with a LoRA critic (critic_lora): the critic keeps no decoder of its own (adapters and a value
head on the reward model's frozen one), the rewards are the reward model's with the critic's
adapters off while its values have them on, and a run resumes exactly with the critic's adapters."""
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from fusedrl.engine.cli import main
from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.config.ppo import LoopConfig, UpdateConfig
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.peft_io import WEIGHTS_FILE
from fusedrl.engine.model.reward_model import load_reward_model, reward_model_from_lm, save_reward_model
from fusedrl.engine.model.value_model import LoRACritic, load_value_model, values_at_targets
from fusedrl.engine.stages.rollout.phase_timer import PhaseTimer
from fusedrl.engine.stages.rollout.answer_rows import sample_and_score
from fusedrl.engine.stages.rollout.build import build_models, build_optimizers
from fusedrl.engine.stages.ppo.trainer import train_ppo
from fusedrl.engine.train.checkpoint import read_tensors
from fusedrl.engine.train.runlog import read_metrics
from engine_testing import random_prompts
from train_testing import checkpoint_data
from test_ppo import config, run_straight_and_resumed, setup, torch_kernels  # noqa: F401 (fixtures)
from test_ppo_lora import resident_parameter_bytes

CRITIC_LORA = LoRAConfig(rank=4, alpha=8.0, target_modules="q_proj,v_proj,o_proj,down_proj")


@pytest.fixture(scope="module")
def rm_dir(setup):
    """A reward model from the policy's weights with a random score head (non-zero rewards)."""
    root, policy_dir, _ = setup
    rm = reward_model_from_lm(load_model(policy_dir))
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.score.weight, std=0.3)
    save_reward_model(rm, root / "critic-lora-rm", source_dir=policy_dir)
    return root / "critic-lora-rm"


def rm_config(setup, rm_dir, name, **fields):
    root, policy_dir, prompts = setup
    return config(root, policy_dir, prompts, name, critic="separate", reward_fn=None, reward_model=str(rm_dir),
                  **fields)


def models_of(cfg):
    return build_models(cfg, torch.device("cpu"), torch.float32, AutoTokenizer.from_pretrained(cfg.policy), None)


def test_lora_critic_holds_no_decoder_of_its_own(setup, rm_dir):
    full = models_of(rm_config(setup, rm_dir, "full-critic-bytes"))
    cfg = rm_config(setup, rm_dir, "lora-critic-bytes", critic_lora=CRITIC_LORA)
    tuned = models_of(cfg)
    assert isinstance(tuned.critic, LoRACritic) and tuned.critic.trunk is tuned.score.rm
    rm_bytes = resident_parameter_bytes(tuned.score.rm)
    critic_bytes = resident_parameter_bytes(tuned.critic)  # its adapters and value head
    others = resident_parameter_bytes(full.policy, full.reference)
    # The full critic is the reward model's size (its value head in place of the score head).
    assert resident_parameter_bytes(full.policy, full.reference, full.score.rm, full.critic) == others + 2 * rm_bytes
    assert resident_parameter_bytes(tuned.policy, tuned.reference, tuned.score.rm, tuned.critic) == \
        others + rm_bytes + critic_bytes
    assert critic_bytes < 0.1 * rm_bytes
    opts, _ = build_optimizers(tuned, cfg)
    trained = {id(p) for group in opts.critic.param_groups for p in group["params"]}
    assert trained == {id(p) for p in tuned.critic.parameters()}
    assert {id(p) for p in tuned.critic.parameters()} == \
        {id(p) for p in [*tuned.critic.lora.parameters(), tuned.critic.value_head.weight]}
    assert not any(p.requires_grad for p in tuned.score.rm.parameters())
    with pytest.raises(ValueError, match="critic_lora.rank > 0 adapts the separate critic: set critic=separate"):
        config(*setup, "shared-critic-lora", critic_lora=CRITIC_LORA)


def test_without_a_reward_model_the_lora_critic_gets_a_frozen_copy_of_the_policy(setup, capsys):
    root, policy_dir, prompts = setup
    cfg = config(root, policy_dir, prompts, "fallback-critic", critic="separate", critic_lora=CRITIC_LORA)
    models = build_models(cfg, torch.device("cpu"), torch.float32, AutoTokenizer.from_pretrained(policy_dir),
                          lambda prompts, responses: [0.0] * len(responses))
    assert "frozen copy of its weights" in capsys.readouterr().err
    trunk = models.critic.trunk
    assert trunk is not models.policy and not any(p.requires_grad for p in trunk.parameters())
    assert resident_parameter_bytes(models.policy, models.reference, trunk) == 3 * resident_parameter_bytes(trunk)
    assert torch.equal(models.critic.value_head.weight, torch.zeros(1, trunk.config.hidden_size))
    assert all(torch.equal(v, models.policy.state_dict()[k]) for k, v in trunk.state_dict().items())


def test_rewards_come_from_the_reward_model_with_the_critic_adapters_off(setup, rm_dir):
    cfg = rm_config(setup, rm_dir, "lora-critic-scores", critic_lora=CRITIC_LORA)
    models = models_of(cfg)
    critic = models.critic
    with torch.no_grad():  # trained-looking adapters, so that leaving them on would show
        for _, a, b in critic.lora.named_targets():
            a.normal_(0, 0.1)
            b.normal_(0, 0.1)
    samples = sample_and_score(models, random_prompts([4, 6], seed=1), cfg.rollout, seed=0,
                               timer=PhaseTimer(torch.device("cpu")))
    packed = samples.packed
    rm = load_reward_model(rm_dir, dtype="float32")
    expected = rm.packed_rewards(packed)  # the pack as scored: its prompts shared
    assert torch.equal(samples.scores, expected) and expected.abs().max() > 0
    assert critic.lora.enabled  # switched back on after scoring
    with torch.no_grad():
        values = critic.response_values(packed)
        base_values = values_at_targets(rm, critic.value_head, packed)
    assert (values - base_values)[packed.grid_mask()].abs().max() > 1e-3  # the values do use the adapters


def test_lora_critic_run_scores_as_a_full_critic_run_and_resumes_exactly(setup, rm_dir):
    root = setup[0]
    loop = LoopConfig(iterations=2, save_every=1, keep_checkpoints=0, progress=False, device="cpu")
    update = UpdateConfig(epochs=1, minibatch_size=6)  # one minibatch per iteration
    train_ppo(rm_config(setup, rm_dir, "critic-full", ppo=update,
                        train=LoopConfig(iterations=1, progress=False, device="cpu")))
    a, b = run_straight_and_resumed(root, lambda run: rm_config(setup, rm_dir, run, train=loop, ppo=update,
                                                                critic_lora=CRITIC_LORA), "critic-lora")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Step 0: the same policy samples the same responses, scored by the same reward model (with the
    # critic's adapters off: test_rewards_come_from_the_reward_model_with_the_critic_adapters_off).
    scores = [[r["score_mean"] for r in read_metrics(root / run) if r["kind"] == "train"]
              for run in ("critic-full", "straight-critic-lora")]
    assert scores[0][0] == scores[1][0] != 0
    straight, resumed = (root / f"{kind}-critic-lora" for kind in ("straight", "resumed"))
    checkpoint = straight / "checkpoints" / "step-00000002"
    assert checkpoint_data(checkpoint)["models"] == ["critic_adapter", "policy"]  # the critic's adapters, not a critic
    x, y = (load_file(run / "final_critic_adapter" / WEIGHTS_FILE) for run in (straight, resumed))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    first, last = (read_tensors(straight / "checkpoints" / f"step-0000000{i}", "models.critic_adapter.") for i in (1, 2))
    assert not all(torch.equal(last[k], first[k]) for k in last)  # the second iteration did train the critic
    merged = load_value_model(straight / "final_critic", dtype="float32")
    rm = load_reward_model(rm_dir, dtype="float32")
    assert torch.equal(merged.value_head.weight, x["base_model.model.score.weight"])
    assert not torch.equal(merged.model.layers[0].self_attn.o_proj.weight, rm.model.layers[0].self_attn.o_proj.weight)
    # `fusedrl export --merge` of the critic's adapters (their base: the reward model) == the run's merge.
    out = root / "merged-critic"
    assert main(["export", str(straight / "final_critic_adapter"), "--merge", "--out", str(out)]) == 0
    exported = load_reward_model(out, dtype="float32")
    assert exported.reward_offset == rm.reward_offset
    assert torch.equal(exported.score.weight, merged.value_head.weight)
    assert all(torch.equal(v, exported.state_dict()[k])
               for k, v in merged.state_dict().items() if k != "value_head.weight")
