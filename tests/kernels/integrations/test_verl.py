"""verl's seams on our kernels against verl's definitions (verl_definitions.py), and registered
into verl 0.9.1 itself where it imports: in this process, and in a fresh process through verl's own
import hooks, as each Ray worker registers (.ci/run installs verl into .ci-verl with --no-deps and
the few modules its import needs; no Ray cluster is started)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedrl.kernels import linear_token_logprobs
from fusedrl.kernels.integrations import verl as ours
from verl_definitions import gae_advantage_return, grpo_outcome, policy_loss_vanilla

B, T = 5, 7


class ActorConfig(dict):
    """The fields of verl's ActorConfig its vanilla loss reads (attributes and .get)."""
    __getattr__ = dict.get


def rollout(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logp = (torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3 - 1).requires_grad_()
    old = logp.detach() + 0.8 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 4:] = 0
    mask[4, :] = 0
    return logp, old, torch.randn(B, T, generator=gen, dtype=torch.float64), mask, gen


@pytest.mark.parametrize("mode, batch_info", [
    ("token-mean", {}), ("token-mean", dict(dp_size=2, batch_num_tokens=40)),
    ("token-sum", dict(dp_size=2)), ("seq-mean-token-sum", dict(dp_size=2, global_batch_size=9)),
    ("seq-mean-token-sum-norm", {}), ("seq-mean-token-sum-norm", dict(loss_scale_factor=3)),
    ("seq-mean-token-mean", {}), ("seq-mean-token-mean", dict(dp_size=4, global_batch_size=10)),
])
def test_policy_loss_is_verls_vanilla(mode, batch_info):
    logp, old, adv, mask, gen = rollout()
    is_weights = torch.rand(B, T, generator=gen, dtype=torch.float64) + 0.5
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28,
                         clip_ratio_c=2.0, global_batch_info=batch_info)
    loss, metrics = ours.compute_policy_loss_fusedrl(old, logp, adv, mask, mode, config, is_weights)
    (grad,) = torch.autograd.grad(loss, logp)
    theirs, clipfrac, ppo_kl, lower = policy_loss_vanilla(old, logp, adv, mask, mode, 0.15, 0.28,
                                                          2.0, is_weights, **batch_info)
    (their_grad,) = torch.autograd.grad(theirs, logp)
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
    assert (grad - their_grad).abs().max() < 1e-6
    assert metrics["actor/pg_clipfrac"] == pytest.approx(clipfrac.item(), abs=1e-6)
    assert metrics["actor/ppo_kl"] == pytest.approx(ppo_kl.item(), abs=1e-6)
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(lower.item(), abs=1e-6)
    assert 0 < clipfrac < 1 and 0 < lower < 1


def test_advantage_estimators_are_verls():
    _, _, rewards, mask, gen = rollout(1)
    mask[4, :3] = 1
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    advantages, returns = ours.compute_gae_advantage_return_fusedrl(rewards, values, mask, 0.99,
                                                                   0.95)
    their_advantages, their_returns = gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    valid = mask != 0
    assert torch.allclose(advantages[valid].double(), their_advantages[valid], atol=1e-5)
    assert torch.allclose(returns[valid].double(), their_returns[valid], atol=1e-5)
    index = ["p", "q", "p", "r", "q"]
    spread, _ = ours.compute_grpo_outcome_advantage_fusedrl(rewards, mask, index)
    expected = grpo_outcome(rewards.sum(-1), index)[:, None] * mask
    assert torch.allclose(spread.double(), expected, atol=1e-5)


def test_linear_cross_entropy_has_verls_shape():
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(2, 3, 8, generator=gen), torch.randn(30, 8, generator=gen)
    labels = torch.randint(0, 30, (2, 3), generator=gen)
    logp, entropy = ours.linear_cross_entropy(hidden, weight, labels, 0.7, "none")
    assert logp.shape == entropy.shape == (2, 3)
    assert torch.equal(logp, linear_token_logprobs(hidden, weight, labels, temperature=0.7))
    total, _ = ours.linear_cross_entropy(hidden, weight, labels, 0.7, "sum")
    assert total.item() == pytest.approx(logp.sum().item())


@pytest.mark.skipif(importlib.util.find_spec("verl") is not None, reason="verl is installed")
def test_register_without_verl_says_so():
    with pytest.raises(ImportError, match=r"register\(\): verl is not importable here"):
        ours.register()


@pytest.mark.skipif(importlib.util.find_spec("verl") is None,
                    reason="verl is not installed (its pins exclude this transformers)")
def test_register_installs_into_verls_registries():
    from verl.trainer.ppo import core_algos
    from verl.utils.kernel import linear_cross_entropy
    ours.register()
    ours.register()
    assert core_algos.get_policy_loss_fn("fusedrl") is ours.compute_policy_loss_fusedrl
    assert core_algos.get_adv_estimator_fn("fusedrl_grpo") is \
        ours.compute_grpo_outcome_advantage_fusedrl
    assert linear_cross_entropy.linear_cross_entropy is ours.linear_cross_entropy


VERL_DIR = Path(os.environ.get("FUSEDRL_VERL_DIR",
                               Path(__file__).resolve().parents[3] / ".ci-verl"))
needs_verl_dir = pytest.mark.skipif(not (VERL_DIR / "verl").is_dir(),
                                    reason=f"verl not installed in {VERL_DIR} (.ci/run installs it)")
WORKER_HOOK = "fusedrl.kernels.integrations.verl_worker"
# What a verl process finds (our loss by verl's lookup, our head where verl's models import it: by
# module attribute, and bound by name at a module's import, as Megatron's forward does), first as
# started, then after verl's external_lib import of verl_worker (each worker's init_model).
PROBE = """
import json, sys, types
import verl
from verl.trainer.ppo import core_algos
from verl.utils.import_utils import import_external_libs
from verl.utils.kernel import linear_cross_entropy as head
from fusedrl.kernels.integrations import verl as ours
bound = types.ModuleType("verl.models.bound_head")
bound.linear_cross_entropy = head.linear_cross_entropy
sys.modules[bound.__name__] = bound


def found():
    try:
        loss = core_algos.get_policy_loss_fn("fusedrl") is ours.compute_policy_loss_fusedrl
    except ValueError as error:
        loss = str(error)
    return {"loss": loss, "head": head.linear_cross_entropy is ours.linear_cross_entropy,
            "bound": bound.linear_cross_entropy is ours.linear_cross_entropy,
            "grpo": "fusedrl_grpo" in core_algos.ADV_ESTIMATOR_REGISTRY}
started = found()
import_external_libs(sys.argv[1])
print(json.dumps({"started": started, "external_lib": found()}))
"""
ALL_OURS = {"loss": True, "head": True, "bound": True, "grpo": True}


def verl_process(env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"}
    env.update(PYTHONPATH=str(VERL_DIR), **env_extra)
    done = subprocess.run([sys.executable, "-c", PROBE, WORKER_HOOK], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_verl_dir
def test_a_verl_worker_registers_through_the_environment_hook():
    """VERL_USE_EXTERNAL_MODULES naming verl_worker, read by `import verl` in every process: the
    process starts with our loss, estimators and head (before any model module binds it)."""
    assert verl_process({"VERL_USE_EXTERNAL_MODULES": WORKER_HOOK})["started"] == ALL_OURS


@needs_verl_dir
def test_a_fresh_verl_process_has_none_of_ours_until_external_lib_imports_the_hook():
    """What a register() in the driver leaves a Ray worker: verl's own lookup refuses "fusedrl";
    external_lib naming verl_worker then installs everything, a head bound by name included."""
    result = verl_process({})
    assert result["started"]["loss"].startswith("Unsupported loss mode: fusedrl")
    assert not any(result["started"][key] for key in ("head", "bound", "grpo"))
    assert result["external_lib"] == ALL_OURS
