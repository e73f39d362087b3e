"""The integration losses and advantages against their hosts' definitions, written out here in
float64: TRL's cispo, sapo, sequence-level ratio, delta and the sampler's IS ratio (the loss types
test_trl.py does not train), our PPO loss from hidden states, and verl's GRPO / RLOO advantages over
uneven uid groups."""
import pytest
import torch

from fusedrl.kernels import aggregate, kl_penalty, ppo_policy_loss, reference
from fusedrl.kernels.integrations import (FusedLinearGRPOLoss, FusedLinearPPOLoss,
                                          group_advantages_by_uid)
from verl_definitions import grpo_outcome

B, T, H, V = 4, 6, 8, 40


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) / H**0.5
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    noise = lambda: 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)  # noqa: E731
    return hidden, weight, ids, mask, torch.randn(B, generator=gen, dtype=torch.float64), noise


def trl_per_token(loss_type, logp, old, adv, mask, level="token", delta=None, eps=(0.2, 0.28)):
    """TRL 1.x's per-token policy loss (GRPOTrainer._compute_loss), transcribed."""
    log_ratio = logp - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    coef_1, adv = log_ratio.exp(), adv[:, None]
    if loss_type == "cispo":
        return -coef_1.clamp(max=eps[1]).detach() * adv * logp
    if loss_type == "sapo":
        tau = torch.where(adv > 0, 1.0, 1.05)
        return -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
    coef_2 = coef_1.clamp(1 - eps[0], 1 + eps[1])
    if delta is not None:
        coef_1 = coef_1.clamp(max=delta)
    return -torch.min(coef_1 * adv, coef_2 * adv)


@pytest.mark.parametrize("loss_type, level, delta, is_ratio", [
    ("cispo", "token", None, False), ("sapo", "token", None, False),
    ("grpo", "sequence", None, False), ("dapo", "token", 1.5, True), ("grpo", "token", None, True),
])
def test_grpo_variants_match_trls_definitions(loss_type, level, delta, is_ratio):
    hidden, weight, ids, mask, adv, noise = inputs()
    is_weight = (noise().exp() if is_ratio else None)
    old_logp = reference.linear_token_logprobs(hidden, weight, ids) + noise()
    ref_logp = old_logp + noise()
    h = hidden.clone().requires_grad_()
    fused = FusedLinearGRPOLoss(beta=0.04, epsilon_high=0.28, loss_type=loss_type,
                                importance_sampling_level=level, delta=delta,
                                use_bias_correction_kl=True)
    ours, metrics = fused(h, weight, ids, mask, adv, ref_per_token_logps=ref_logp,
                          old_per_token_logps=old_logp, vllm_is_ratio=is_weight)
    (grad,) = torch.autograd.grad(ours, h)
    h2 = hidden.clone().requires_grad_()
    logp = reference.linear_token_logprobs(h2, weight, ids)
    per_token = trl_per_token(loss_type, logp, old_logp, adv, mask, level, delta)
    if is_weight is not None:
        per_token = per_token * is_weight
    log_ratio = logp - old_logp
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    k3 = (ref_logp - logp).exp() - (ref_logp - logp) - 1
    per_token = per_token + 0.04 * k3 * log_ratio.exp()
    if loss_type in ("grpo", "sapo"):
        theirs = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:
        theirs = (per_token * mask).sum() / mask.sum()
    (their_grad,) = torch.autograd.grad(theirs, h2)
    assert abs(ours.item() - theirs.item()) < 1e-6
    assert (grad - their_grad).abs().max() < 1e-6
    assert len(metrics) == 2 and metrics[0] > 0


def trl_loss(loss_type, logp, old, ref, adv, mask, level, is_ratio=None, beta=0.04,
             eps=(0.2, 0.28)):
    """TRL 1.x's loss with a weighting mask [B, T], [B, T] advantages and a sampler IS ratio,
    transcribed (importance_sampling_level "sequence" through the weighted sequence mean; the
    GSPO-token variant as verl defines it)."""
    log_ratio = logp - old
    if level != "token":
        mean = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
        log_ratio = mean if level == "sequence" else mean.detach() + logp - logp.detach()
    coef_1 = log_ratio.exp()
    per_token = -torch.min(coef_1 * adv, coef_1.clamp(1 - eps[0], 1 + eps[1]) * adv)
    if is_ratio is not None:
        per_token = per_token * is_ratio
    k3 = (ref - logp).exp() - (ref - logp) - 1
    per_token = per_token + beta * k3
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


@pytest.mark.parametrize("loss_type, level", [("grpo", "sequence"), ("bnpo", "sequence"),
                                              ("grpo", "sequence_token"), ("bnpo", "token")])
@pytest.mark.parametrize("steps", [T, 1])
def test_float_masks_token_advantages_and_gspo_levels_in_float64(loss_type, level, steps):
    """A mask of weights (a row summing below 1, an empty row), [B, T] advantages and a [B, T] IS
    ratio: loss and gradient equal TRL's definition in float64; binary_mask reads it as 0/1."""
    hidden, weight, ids, _, _, noise = inputs(2)
    hidden, ids = hidden[:, :steps].contiguous(), ids[:, :steps].contiguous()
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(B, steps, generator=gen, dtype=torch.float64) * 0.9 + 0.1
    mask[0, :] = 0.0
    mask[1, :] = 0.3 / steps
    adv = torch.randn(B, steps, generator=gen, dtype=torch.float64)
    is_ratio = noise()[:, :steps].exp()
    old = reference.linear_token_logprobs(hidden, weight, ids) + 2 * noise()[:, :steps]
    ref = old + noise()[:, :steps]
    h = hidden.clone().requires_grad_()
    fused = FusedLinearGRPOLoss(beta=0.04, epsilon_high=0.28, loss_type=loss_type,
                                importance_sampling_level=level)
    ours, metrics = fused(h, weight, ids, mask, adv, ref_per_token_logps=ref,
                          old_per_token_logps=old, vllm_is_ratio=is_ratio)
    (grad,) = torch.autograd.grad(ours, h)
    h2 = hidden.clone().requires_grad_()
    logp = reference.linear_token_logprobs(h2, weight, torch.where(mask != 0, ids, -100))
    theirs = trl_loss(loss_type, logp, old, ref, adv, mask, level, is_ratio)
    (their_grad,) = torch.autograd.grad(theirs, h2)
    assert abs(ours.item() - theirs.item()) < 1e-6
    assert (grad - their_grad).abs().max() <= 1e-5 * their_grad.abs().max()
    assert len(metrics) == 2 and metrics[0] > 0
    binary = FusedLinearGRPOLoss(beta=0.04, epsilon_high=0.28, loss_type=loss_type,
                                 importance_sampling_level=level, binary_mask=True)
    as_ones = trl_loss(loss_type, logp.detach(), old, ref, adv, (mask != 0).double(), level,
                       is_ratio)
    assert binary(hidden, weight, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old,
                  vllm_is_ratio=is_ratio)[0].item() == pytest.approx(as_ones.item(), abs=1e-6)


def test_sequence_levels_differ_only_where_advantages_vary_along_a_row():
    """GSPO and GSPO-token: the same loss; the same gradient for one advantage per row, different
    gradients for per-token advantages."""
    hidden, weight, ids, mask, adv, noise = inputs(4)
    old = reference.linear_token_logprobs(hidden, weight, ids) + noise()
    grads = {}
    for name, advantages in (("row", adv), ("token", noise())):
        for level in ("sequence", "sequence_token"):
            h = hidden.clone().requires_grad_()
            loss, _ = FusedLinearGRPOLoss(beta=0.0, loss_type="bnpo",
                                          importance_sampling_level=level)(
                h, weight, ids, mask, advantages, old_per_token_logps=old)
            grads[name, level] = (loss.item(), torch.autograd.grad(loss, h)[0])
    for name in ("row", "token"):
        assert grads[name, "sequence"][0] == pytest.approx(grads[name, "sequence_token"][0])
    assert torch.allclose(grads["row", "sequence"][1], grads["row", "sequence_token"][1],
                          atol=1e-7)
    assert not torch.allclose(grads["token", "sequence"][1], grads["token", "sequence_token"][1],
                              atol=1e-4)


def test_grpo_loss_refusals_are_one_line():
    hidden, weight, ids, mask, adv, noise = inputs()
    old = reference.linear_token_logprobs(hidden, weight, ids)
    cases = [
        (dict(), dict(), "beta=0.04 needs ref_per_token_logps"),
        (dict(beta=0.0), dict(mask=-mask), "attention_mask must be >= 0"),
        (dict(beta=0.0), dict(adv=adv[:2]), r"advantages must have shape \(4,\), \(4, 1\) or "
                                            r"\(4, 6\), got \(2,\)"),
        (dict(beta=0.0), dict(vllm_is_ratio=torch.ones(4, 2)), "vllm_is_ratio must have shape"),
        (dict(importance_sampling_level="seq"), dict(), "importance_sampling_level must be one"),
    ]
    for init, call, message in cases:
        args = {"mask": mask, "adv": adv, "vllm_is_ratio": None, **call}
        with pytest.raises(ValueError, match=message) as error:
            FusedLinearGRPOLoss(**init)(hidden, weight, ids, args["mask"], args["adv"],
                                        old_per_token_logps=old,
                                        vllm_is_ratio=args["vllm_is_ratio"])
        assert "\n" not in str(error.value)


def test_ppo_loss_from_hidden_states_is_the_composition():
    hidden, weight, ids, mask, _, noise = inputs(1)
    adv, old = noise(), reference.linear_token_logprobs(hidden, weight, ids) + noise()
    ref = old + noise()
    h = hidden.clone().requires_grad_()
    loss_fn = FusedLinearPPOLoss(clip_eps=0.2, clip_eps_high=0.3, entropy_coef=0.01, kl_coef=0.1,
                                 agg="seq-mean-token-mean", temperature=0.9)
    ours, stats = loss_fn(h, weight, ids, mask, adv, old, ref_per_token_logps=ref)
    (grad,) = torch.autograd.grad(ours, h)
    h2 = hidden.clone().requires_grad_()
    labels = torch.where(mask != 0, ids, -100)
    logp, entropy = reference.linear_token_logprobs(h2, weight, labels, temperature=0.9,
                                                    return_entropy=True)
    agg = "seq-mean-token-mean"
    theirs = (ppo_policy_loss(logp, old, adv, mask.bool(), clip_eps=0.2, clip_eps_high=0.3,
                              agg=agg)[0]
              - 0.01 * aggregate(entropy, mask, agg)
              + 0.1 * aggregate(kl_penalty(logp, ref, estimator="k3", mask=mask), mask, agg))
    (their_grad,) = torch.autograd.grad(theirs, h2)
    assert abs(ours.item() - theirs.item()) < 1e-6            # the PPO loss comes back in fp32
    assert (grad - their_grad).abs().max() < 1e-6
    assert {"clipfrac_low", "clipfrac_high", "entropy", "kl"} <= set(stats)
    with pytest.raises(ValueError, match="kl_coef != 0 needs ref_per_token_logps"):
        loss_fn(h, weight, ids, mask, adv, old)


def test_group_advantages_over_uneven_uid_groups():
    scores = torch.tensor([1.0, 0.0, 3.0, 2.0, 5.0, 4.0, 7.0], dtype=torch.float64)
    uids = ["a", "b", "a", "c", "b", "a", "d"]                  # 3, 2, 1 and 1 responses
    assert torch.allclose(group_advantages_by_uid(scores, uids).double(), grpo_outcome(scores, uids),
                          atol=1e-6)
    assert torch.allclose(group_advantages_by_uid(scores, uids, estimator="dr_grpo").double(),
                          grpo_outcome(scores, uids, by_std=False), atol=1e-6)
    rloo = group_advantages_by_uid(scores, uids, estimator="rloo")
    assert rloo[0].item() == pytest.approx(1.0 - (3.0 + 4.0) / 2)
    assert rloo[3].item() == 0.0
    with pytest.raises(ValueError, match="scores must be \\[N\\] with N uids"):
        group_advantages_by_uid(scores, uids[:3])


def test_the_package_imports_no_host_library():
    import subprocess
    import sys
    code = ("import sys, fusedrl.kernels.integrations; "
            "print(sorted(m for m in ('trl', 'liger_kernel', 'verl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
