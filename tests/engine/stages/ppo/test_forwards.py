"""One forward for scoring and training: on the fused kernels (the GPU's path, interpreted on the
CPU), the rollout's old log-probs (scored with autograd off) and the first update's log-probs (with
autograd on) of the same packed minibatch are the same numbers, so the first ratio is exactly 1.
The rollout's answers are sampled on the torch kernels: the sampler is not what is compared, and in
the interpreter its decode steps would take most of the test."""
import pytest
import torch
from transformers import AutoTokenizer

from fusedrl.engine.config.ppo import UpdateConfig
from fusedrl.engine.stages.rollout.build import build_models
from fusedrl.engine.stages.ppo.forwards import policy_forward
from fusedrl.engine.stages.ppo.update import UpdateSettings, minibatch_loss
from fusedrl.kernels import use_backend
from engine_testing import random_prompts, rewards_in_thread
from test_ppo import config, low_id_fraction, rollout_of, setup, vowel_fraction  # noqa: F401 (fixture)
from kernel_testing import DEVICE
from train_testing import save_tiny_model


@pytest.fixture(scope="module")
def one_layer_policy(setup):
    """A one-layer policy: the interpreter runs every kernel program in Python, and a second layer
    would repeat the first's kernels with other weights."""
    return save_tiny_model(setup[0] / "one-layer-policy", num_hidden_layers=1)


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_first_update_ratio_is_exactly_one(setup, one_layer_policy, critic):
    root, _, prompts = setup
    policy_dir = one_layer_policy
    cfg = config(root, policy_dir, prompts, "one-forward", critic=critic,
                 ppo=UpdateConfig(epochs=1, minibatch_size=6, ent_coef=0.01))
    with use_backend("triton"):
        models = build_models(cfg, torch.device(DEVICE), torch.float32, AutoTokenizer.from_pretrained(policy_dir),
                              rewards_in_thread(vowel_fraction))
        models.score = low_id_fraction
        rollout, _ = rollout_of(models, random_prompts([5, 3], seed=3), cfg, 0.05, sampler_backend="torch")
        assert rollout.old_logprobs.grad_fn is None   # scored with autograd off
        logp, _, _ = policy_forward(models, rollout.packed, cfg.rollout.temperature, with_entropy=True)
        assert logp.requires_grad   # the update's forward, differentiable
        _, stats = minibatch_loss(models, rollout, UpdateSettings.of(cfg))
    mask = rollout.mask
    assert mask.sum() > 10
    assert torch.equal(logp.detach()[mask], rollout.old_logprobs[mask])   # exp(0) = 1 on every token
    assert float(stats["approx_kl"]) == 0.0 and float(stats["clipfrac"]) == 0.0
