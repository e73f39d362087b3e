"""What host stacks (TRL, verl, transformers models) pass the RL ops: mixed dtypes, [B, T, H]
hidden states, float masks, per-sequence advantages, logit scaling and soft-capping, the
bias-corrected KL, the two sides of the clip fraction, the aggregation normalizers; and the
PyTorch path's row chunks. Each against the float64 reference."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedrl.kernels.rl.linear_logprobs as linear_module
from fusedrl.kernels import (aggregate, kl_penalty, linear_token_logprobs, ppo_policy_loss,
                             reference, use_backend)
from kernel_testing import DEVICE, assert_close, needs_triton, rand_mask

BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def head_inputs(lead, hidden_size, vocab, dtype=torch.float32, *, bias=False):
    hidden = torch.randn(*lead, hidden_size, device=DEVICE).to(dtype)
    weight = torch.randn(vocab, hidden_size, device=DEVICE) / hidden_size**0.5 * 3
    b = torch.randn(vocab, device=DEVICE) * 0.5 if bias else None
    labels = torch.randint(0, vocab, lead, device=DEVICE)
    labels[torch.rand(lead, device=DEVICE) < 0.2] = -100
    return hidden, weight, b, labels


def run_head(fn, hidden, weight, bias, labels, **kwargs):
    """(logp, entropy, d hidden, d weight[, d bias]) of a fixed random weighting of the outputs."""
    params = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    logp, entropy = fn(params[0], params[1], labels, bias=params[2] if bias is not None else None,
                       return_entropy=True, **kwargs)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    g1, g2 = (torch.randn(logp.shape, generator=gen, device=DEVICE).to(logp.dtype) for _ in "ab")
    (logp * g1 + entropy * g2).sum().backward()
    return [logp, entropy] + [p.grad for p in params]


def as_double(*tensors):
    return [t.double() if t is not None and t.is_floating_point() else t for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logit_scale, softcap", [(1.0, None), (0.37, None), (1.0, 2.5),
                                                  (1.7, 1.5)])
def test_scaled_and_capped_head_matches_reference(backend, logit_scale, softcap):
    inputs = head_inputs((2, 9), 16, 131, bias=True)
    kwargs = dict(temperature=0.7, logit_scale=logit_scale, softcap=softcap)
    with use_backend(backend):
        ours = run_head(linear_token_logprobs, *inputs, chunk_size=5, **kwargs)
    exact = run_head(reference.linear_token_logprobs, *as_double(*inputs), **kwargs)
    for name, a, e in zip(["logp", "entropy", "d_hidden", "d_weight", "d_bias"], ours, exact):
        assert a.shape == e.shape, name
        assert_close(a, e, atol=2e-5, rtol=2e-5, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_hidden_with_fp32_head_computes_in_fp32(backend):
    hidden, weight, _, labels = head_inputs((3, 5), 32, 97, torch.bfloat16)
    with use_backend(backend):
        logp, entropy, d_hidden, d_weight = run_head(linear_token_logprobs, hidden, weight, None,
                                                     labels)
    assert d_hidden.dtype == torch.bfloat16 and d_weight.dtype == torch.float32
    exact = run_head(reference.linear_token_logprobs, *as_double(hidden, weight, None), labels)
    assert_close(logp, exact[0], atol=1e-5, rtol=1e-5, name="logp")
    assert_close(entropy, exact[1], atol=1e-5, rtol=1e-5, name="entropy")
    assert_close(d_weight, exact[3], atol=1e-5, rtol=1e-5, name="d_weight")
    assert_close(d_hidden.float(), exact[2], atol=2e-2, rtol=1e-2, name="d_hidden")


def test_three_dim_hidden_equals_flattened_rows_and_edge_shapes():
    hidden, weight, _, labels = head_inputs((3, 7), 8, 50)
    three = linear_token_logprobs(hidden, weight, labels)
    flat = linear_token_logprobs(hidden.reshape(21, 8), weight, labels.reshape(21))
    assert three.shape == (3, 7) and torch.equal(three.reshape(21), flat)
    empty = linear_token_logprobs(hidden[:, :0], weight, labels[:, :0])
    assert empty.shape == (3, 0)
    with pytest.raises(ValueError, match=r"labels must have shape \(3, 7\)"):
        linear_token_logprobs(hidden, weight, labels.reshape(21))
    with pytest.raises(ValueError, match="softcap must be a positive number, got 0"):
        linear_token_logprobs(hidden, weight, labels, softcap=0)


class LargestOutput(TorchDispatchMode):
    """The most elements any one op produced while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_torch_path_holds_one_chunk_of_logits():
    hidden, weight, _, labels = head_inputs((40,), 4, 300)
    hidden.requires_grad_()
    with use_backend("torch"), LargestOutput() as seen:
        linear_token_logprobs(hidden, weight, labels, chunk_size=6, return_entropy=True)[1] \
            .sum().backward()
    # [6, 300] logits and their gradient at most (the head itself is [300, 4])
    assert seen.largest <= 6 * 300


def test_default_chunk_is_a_byte_budget():
    for itemsize in (2, 4):
        rows = linear_module.default_chunk_size(10**6, 32000, itemsize)
        assert rows % 16 == 0 and rows * 32000 * itemsize <= linear_module.CHUNK_BYTES
    assert linear_module.default_chunk_size(10, 151936, 4) == 10


def loss_inputs(b=4, t=6):
    logp = (torch.randn(b, t, device=DEVICE) * 0.3 - 1).requires_grad_()
    old = logp.detach() + torch.randn(b, t, device=DEVICE) * 0.3
    mask = rand_mask(b, t)
    mask[:, 0] = True
    return logp, old, mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sequence_advantages_and_float_masks(backend):
    logp, old, mask = loss_inputs()
    per_seq = torch.randn(4, device=DEVICE)
    with use_backend(backend):
        full = ppo_policy_loss(logp, old, per_seq[:, None].expand(4, 6).clone(), mask)
        for advantages in (per_seq, per_seq[:, None]):
            for m in (mask.float(), mask.to(torch.int64)):
                got = ppo_policy_loss(logp, old, advantages, m, clip_sides=True)
                assert_close(got[0], full[0], atol=1e-6, rtol=1e-6, name="loss")
        with pytest.raises(ValueError, match=r"advantages must have shape \(4, 6\), \(4,\) or "
                                             r"\(4, 1\).*got \(6,\)"):
            ppo_policy_loss(logp, old, torch.zeros(6, device=DEVICE), mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_sides_count_each_side(backend):
    logp, old, mask = loss_inputs(6, 9)
    advantages = torch.randn(6, 9, device=DEVICE)
    with use_backend(backend):
        _, stats = ppo_policy_loss(logp, old, advantages, mask, clip_eps=0.1, clip_eps_high=0.2,
                                   clip_sides=True)
    ratio = (logp.detach() - old).double().exp()
    low = ((ratio < 0.9) & (advantages < 0))[mask].double().mean()
    high = ((ratio > 1.2) & (advantages > 0))[mask].double().mean()
    assert 0 < low < 1 and 0 < high < 1
    assert_close(stats["clipfrac_low"], low, atol=1e-6, rtol=0, name="clipfrac_low")
    assert_close(stats["clipfrac_high"], high, atol=1e-6, rtol=0, name="clipfrac_high")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_is_weight_is_differentiable(backend):
    """TRL's bias-corrected KL: k3 times the ratio, gradient through both."""
    logp, old, mask = loss_inputs()
    ref = old + 0.2
    ratio = lambda x: (x - old).exp()                        # noqa: E731
    with use_backend(backend):
        ours = kl_penalty(logp, ref, estimator="k3", mask=mask.float(), is_weight=ratio(logp))
    exact_logp = logp.detach().double().requires_grad_()
    k3 = (ref.double() - exact_logp).exp() - (ref.double() - exact_logp) - 1
    exact = torch.where(mask, k3 * ratio(exact_logp.double()), 0.0)
    assert_close(ours, exact, atol=1e-6, rtol=1e-6, name="kl")
    g = torch.randn(4, 6, device=DEVICE)
    (grad,) = torch.autograd.grad((ours * g).sum(), logp)
    (exact_grad,) = torch.autograd.grad((exact * g.double()).sum(), exact_logp)
    assert_close(grad, exact_grad, atol=1e-5, rtol=1e-5, name="d_logp")


def test_aggregate_takes_the_hosts_normalizers():
    per_token = torch.randn(4, 6, dtype=torch.float64, device=DEVICE)
    mask = rand_mask(4, 6).to(torch.float64)
    # TRL's dr_grpo: the masked sum over B x max_completion_length; verl's: over a constant.
    max_len = 10
    dr_grpo = aggregate(per_token, mask, "seq-mean-token-sum-norm", 4 * max_len)
    assert_close(dr_grpo, (per_token * mask).sum() / (4 * max_len), atol=1e-7, rtol=0,
                 name="dr_grpo")
    bnpo = aggregate(per_token, mask, "token-mean")
    assert_close(bnpo, (per_token * mask).sum() / mask.sum(), atol=1e-7, rtol=0, name="bnpo")


def test_torch_path_masked_vocabulary_stays_finite():
    """-inf logits (a bias masking part of the vocabulary): p log p and its gradient are 0 there."""
    hidden, weight, bias, labels = head_inputs((11,), 8, 60, bias=True)
    bias[40:] = float("-inf")
    labels = labels.clamp(max=39)
    with use_backend("torch"):
        ours = run_head(linear_token_logprobs, hidden, weight, bias, labels, chunk_size=4)
    exact = run_head(reference.linear_token_logprobs, *as_double(hidden, weight, bias), labels)
    for name, a, e in zip(["logp", "entropy", "d_hidden", "d_weight"], ours, exact):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, atol=2e-5, rtol=2e-5, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_loss_and_gae_take_float_masks(backend):
    from fusedrl.kernels import gae, ppo_value_loss
    values, old, mask = loss_inputs(3, 8)
    returns = torch.randn(3, 8, device=DEVICE)
    with use_backend(backend):
        by_float = ppo_value_loss(values, old, returns, mask.float())[0]
        by_bool = ppo_value_loss(values, old, returns, mask)[0]
        adv_float = gae(returns, old, mask.double(), gamma=0.9, lam=0.8)
        adv_bool = gae(returns, old, mask, gamma=0.9, lam=0.8)
    assert torch.equal(by_float, by_bool)
    assert all(torch.equal(a, b) for a, b in zip(adv_float, adv_bool))
