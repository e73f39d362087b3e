"""Kernel launches and host syncs of each small RL op, counted on the CPU (bench/launch_count.py),
held under their budgets: ppo_policy_loss forward + backward <= 3 in every mode,
ppo_value_loss <= 3, kl_penalty forward 1 (clamps included) and backward 1, masked_whiten <= 2,
gae forward 1; no host sync inside any op. Inputs are built, and the upstream gradient seeded,
before counting (the seed is the caller's: one for a whole loss)."""
import pytest
import torch

from fusedrl import kernels
from kernel_testing import DEVICE, needs_triton, rand_mask
from fusedrl.bench.launch_count import LaunchCounter

pytestmark = needs_triton
SHAPE = (3, 37)
POLICY_MODES = {
    "token": {}, "dual-clip": dict(dual_clip=3.0), "clip-higher": dict(clip_eps_high=0.28),
    **{agg: dict(agg=agg) for agg in ("seq-mean-token-mean", "seq-mean-token-sum", "token-sum",
                                      "seq-mean-token-sum-norm")},
    "gspo": dict(ratio_level="sequence", agg="seq-mean-token-mean"),
    "tis-token": dict(is_mode="tis"), "tis-sequence": dict(is_mode="tis", is_level="sequence"),
    "mis-token": dict(is_mode="mis"), "mis-sequence": dict(is_mode="mis", is_level="sequence"),
    "gspo-mis": dict(ratio_level="sequence", is_mode="mis", is_level="sequence"),
}


def counted(fn):
    """(launches, names, syncs) of fn() under the Triton backend."""
    with kernels.use_backend("triton"), LaunchCounter() as counter:
        fn()
    return counter.launches, counter.names, dict(counter.syncs)


def loss_inputs(dtype=torch.float32):
    x = torch.randn(SHAPE, device=DEVICE).to(dtype).requires_grad_()
    return x, torch.randn(SHAPE, device=DEVICE).to(dtype), torch.randn(SHAPE, device=DEVICE), rand_mask(*SHAPE)


def forward_backward(loss_fn):
    seed = torch.ones((), device=DEVICE)

    def run():
        loss, _ = loss_fn()
        torch.autograd.backward(loss, seed)
    return run


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("mode", POLICY_MODES)
def test_policy_loss_budget(mode, with_mask):
    logp, old, adv, mask = loss_inputs(torch.bfloat16)
    rollout = old.detach() + 0.1 * torch.randn(SHAPE, device=DEVICE)
    kwargs = dict(POLICY_MODES[mode], rollout_logprobs=rollout)
    launches, names, syncs = counted(forward_backward(
        lambda: kernels.ppo_policy_loss(logp, old, adv, mask if with_mask else None, **kwargs)))
    assert launches <= 3 and syncs == {}, names
    assert logp.grad is not None and logp.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("clip_eps", [0.2, None])
def test_value_loss_budget(clip_eps):
    values, old, returns, mask = loss_inputs()
    launches, names, syncs = counted(forward_backward(
        lambda: kernels.ppo_value_loss(values, old, returns, mask, clip_eps=clip_eps)))
    assert launches <= 3 and syncs == {}, names


@pytest.mark.parametrize("clamps", [{}, dict(clamp=10.0, log_ratio_clamp=20.0)], ids=["plain", "clamps"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_budget(estimator, clamps):
    logp, ref, _, mask = loss_inputs()
    out = {}
    launches, names, syncs = counted(lambda: out.setdefault(
        "kl", kernels.kl_penalty(logp, ref, estimator=estimator, mask=mask, **clamps)))
    assert launches == 1 and syncs == {}, names
    upstream = torch.randn(SHAPE, device=DEVICE)
    launches, names, syncs = counted(lambda: out["kl"].backward(upstream))
    assert launches == 1 and syncs == {}, names


def test_whiten_and_gae_budgets():
    rewards, values, _, mask = loss_inputs()
    rewards, values = rewards.detach(), values.detach()
    launches, names, syncs = counted(lambda: kernels.masked_whiten(rewards, mask))
    assert launches <= 2 and syncs == {}, names
    launches, names, syncs = counted(lambda: kernels.gae(rewards, values, mask, gamma=0.99, lam=0.95))
    assert launches == 1 and syncs == {}, names


def test_counter_sees_triton_aten_and_custom_ops():
    x = torch.randn(5, device=DEVICE)
    mask = torch.ones(5, dtype=torch.bool, device=DEVICE)
    launches, names, syncs = counted(lambda: (x + 1, x.view(5, 1), torch.empty(3), bool(x.sum() > 0),
                                              kernels.masked_whiten(x, mask)))
    # add, sum, gt, the item of bool(); the two Triton kernels; no view, no allocation
    assert names[:4] == ["aten::add.Tensor", "aten::sum", "aten::gt.Scalar", "aten::_local_scalar_dense"]
    assert [n.split(":")[0] for n in names[4:]] == ["triton", "triton"] and launches == 6
    assert syncs == {"item/bool": 1}
    launches, names, _ = counted(lambda: torch.ops.fusedrl.masked_whiten(x, mask, True, 1e-8))
    assert names == ["fusedrl::masked_whiten"]                     # a custom op is one launch
