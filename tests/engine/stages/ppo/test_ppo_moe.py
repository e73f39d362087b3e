"""PPO on a Qwen3-MoE policy with routing replay: the rollout keeps the sampler's experts of every
token, the old-log-prob and update forwards route by them, and the first update's ratio is exactly
1 on every token, also on a minibatch cut from the rollout, with the router losses in the update's
loss, for softmax and sigmoid routers; rollout.exact is refused. The forwards compared run on the
fused kernels (interpreted on the CPU) through one sparse layer: the interpreter runs every program
in Python. The answers are sampled on torch's kernels, whose rounding differs from the fused ones'
(the routing records still decide the experts)."""
import pytest
import torch
from transformers import AutoTokenizer

from fusedrl.engine.config.moe import RouterLossConfig
from fusedrl.engine.config.ppo import LoopConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.errors import UsageError
from fusedrl.engine.stages.ppo.forwards import policy_forward
from fusedrl.engine.stages.rollout.build import build_models
from fusedrl.engine.stages.ppo.trainer import train_ppo
from fusedrl.engine.stages.ppo.update import UpdateSettings, minibatch_loss
from fusedrl.kernels import use_backend
from engine_testing import make_tokenizer, random_prompts, rewards_in_thread
from kernel_testing import DEVICE
from moe_testing import make_moe_model
from test_ppo import config, low_id_fraction, rollout_of, vowel_fraction  # noqa: F401


def policy_setup(root, scoring_func):
    """A one-layer Qwen3-MoE policy, its layer sparse, whose router scores by softmax (config.json
    without scoring_func) or by sigmoid (scoring_func, DeepSeek's key), and two prompts."""
    extra = {} if scoring_func == "softmax" else {"scoring_func": scoring_func}
    make_moe_model("qwen3_moe", num_hidden_layers=1, mlp_only_layers=[], **extra).save_pretrained(root / "policy")
    make_tokenizer().save_pretrained(root / "policy")
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello world"}\n{"prompt": "lazy dog"}\n')
    return root, root / "policy", prompts


@pytest.fixture(scope="module")
def moe_setup(tmp_path_factory):
    return policy_setup(tmp_path_factory.mktemp("ppo_moe"), "softmax")


@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_routing_replay_makes_the_first_ratio_exactly_one(moe_setup, tmp_path, scoring_func):
    root, policy_dir, prompts = moe_setup if scoring_func == "softmax" else policy_setup(tmp_path, scoring_func)
    # Rows read whole: a minibatch's shared layout differs from the rollout's, which rounds apart.
    cfg = config(root, policy_dir, prompts, "replay", ppo=UpdateConfig(epochs=1, minibatch_size=6),
                 moe=RouterLossConfig(router_aux_loss_coef=0.01, router_z_loss_coef=0.001),
                 train=LoopConfig(iterations=2, progress=False, resume=True, device="cpu",
                                  prefix_sharing=False))
    assert cfg.rollout.routing_replay  # on by default
    with use_backend("triton"):
        models = build_models(cfg, torch.device(DEVICE), torch.float32, AutoTokenizer.from_pretrained(policy_dir),
                              rewards_in_thread(vowel_fraction))
        assert models.policy.config.moe.scoring_func == scoring_func
        models.score = low_id_fraction
        rollout, metrics = rollout_of(models, random_prompts([5, 3], seed=3), cfg, 0.05,
                                     sampler_backend="torch")
        packed = rollout.packed
        assert packed.routing.shape == (packed.input_ids.shape[0], 1, 2) and packed.routing.dtype == torch.int16
        on = packed.routing.device
        last = torch.tensor(packed.seqlens, device=on).cumsum(0) - 1  # each row's last token: never forwarded by the sampler
        recorded = torch.ones(packed.input_ids.shape[0], dtype=torch.bool, device=on).index_fill(0, last, False)
        assert (packed.routing[recorded] >= 0).all() and (packed.routing[~recorded] == -1).all()
        logp, _, _ = policy_forward(models, packed, cfg.rollout.temperature, with_entropy=False)
        minibatch = rollout.rows([4, 1, 5])
        loss, stats = minibatch_loss(models, minibatch, UpdateSettings.of(cfg))
        loss.backward()  # through the router losses too
        # Routed elsewhere, the same tokens score differently: the forwards do follow the records.
        flipped = packed._replace(routing=torch.where(packed.routing >= 0, 7 - packed.routing, -1).to(torch.int16))
        with torch.no_grad():
            moved, _, _ = policy_forward(models, flipped, cfg.rollout.temperature, with_entropy=False)
    mask = rollout.mask
    assert torch.equal(logp.detach()[mask], rollout.old_logprobs[mask])
    # The ratio is 1 to fp32 rounding: a minibatch of 3 rows forwards apart from the rollout's 6.
    assert abs(float(stats["approx_kl"])) < 1e-7 and float(stats["clipfrac"]) == 0.0
    assert float(stats["router_aux_loss"]) > 0 and float(stats["router_z_loss"]) > 0
    assert models.policy.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    assert not torch.allclose(moved[mask], rollout.old_logprobs[mask])
    assert metrics["logprob_mismatch_max"] < 1e-4  # the sampler's log-probs, from the same experts


def test_exact_rollouts_are_refused_for_moe(moe_setup):
    root, policy_dir, prompts = moe_setup
    cfg = config(root, policy_dir, prompts, "exact", rollout=RolloutConfig(
        prompts_per_iteration=2, samples_per_prompt=2, max_new_tokens=4, kv_cache_memory=1 << 22, exact=True))
    # refused at the run's start, before any model loads (its config.json tells it is MoE)
    with pytest.raises(UsageError, match="^rollout.exact=True with a mixture-of-experts model: "):
        train_ppo(cfg, reward_fn=vowel_fraction)
