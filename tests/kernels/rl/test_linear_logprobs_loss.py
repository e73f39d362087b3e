"""A loss of the head's log-probs with its gradients taken in the forward
(kernels/rl/linear_logprobs_loss.py) against autograd through the reference's [N, V] logits, and
FusedLinearGRPOLoss's gradients-in-forward path against its linear_token_logprobs path."""
import pytest
import torch

from fusedrl.kernels import reference
from fusedrl.kernels.integrations import FusedLinearGRPOLoss
from fusedrl.kernels.rl import linear_logprobs_loss as loss_module
from fusedrl.kernels.rl.linear_logprobs_loss import linear_logprobs_loss

N, H, V = 23, 12, 57


def head_inputs(dtype, seed, with_bias):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, dtype=dtype)
    weight = torch.randn(V, H, generator=gen, dtype=dtype) / H**0.5
    bias = torch.randn(V, generator=gen, dtype=dtype) if with_bias else None
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[[0, 7, 8, N - 1]] = -100
    # fresh per-row coefficients of a loss that is not linear in the log-probs
    coef = torch.randn(N, generator=gen, dtype=torch.float64)
    return hidden, weight, bias, labels, coef


def row_loss_of(coef):
    """sum_r coef_r * (logp_r + exp(logp_r) + logp_r^2 / 4) over the rows given."""
    def loss(logp, start, end):
        c = coef[start:end].to(logp.dtype)
        return (c * (logp + logp.exp() + logp * logp / 4)).sum()
    return loss


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("with_bias, scale, softcap, temperature", [
    (False, 1.0, None, 1.0), (True, 1.3, None, 0.7), (True, 1.0, 5.0, 1.1)])
@pytest.mark.parametrize("bounds", [[(0, N)], [(0, 5), (5, 5), (5, 16), (16, N)]])
def test_loss_value_and_gradients_match_autograd_through_the_logits(
        dtype, tol, with_bias, scale, softcap, temperature, bounds):
    hidden, weight, bias, labels, coef = head_inputs(dtype, seed=len(bounds) + int(scale * 10),
                                                     with_bias=with_bias)
    head = dict(temperature=temperature, logit_scale=scale, softcap=softcap)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    loss, logp, entropy = linear_logprobs_loss(
        leaves[0], leaves[1], labels, row_loss_of(coef), bounds,
        bias=leaves[2] if with_bias else None, return_entropy=True, **head)
    (3.0 * loss).backward()
    exact = [t.double().clone().requires_grad_() for t in (hidden, weight)
             + ((bias,) if with_bias else ())]
    ref_logp, ref_entropy = reference.linear_token_logprobs(
        exact[0], exact[1], labels, bias=exact[2] if with_bias else None, return_entropy=True,
        **head)
    ref_loss = row_loss_of(coef)(ref_logp, 0, N)
    grads = torch.autograd.grad(3.0 * ref_loss, exact)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=tol, abs=tol)
    assert not logp.requires_grad and not entropy.requires_grad
    torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), rtol=tol, atol=tol)
    assert (logp[labels == -100] == 0).all()
    for leaf, want in zip(leaves, grads):
        assert leaf.grad.dtype == leaf.dtype
        assert (leaf.grad.double() - want).abs().max() <= tol * want.abs().max()


def test_a_head_without_gradients_still_gives_the_hidden_states_theirs():
    hidden, weight, _, labels, coef = head_inputs(torch.float64, seed=5, with_bias=False)
    leaf = hidden.clone().requires_grad_()
    loss, _, entropy = linear_logprobs_loss(leaf, weight, labels, row_loss_of(coef), [(0, N)])
    loss.backward()
    exact = hidden.clone().requires_grad_()
    (want,) = torch.autograd.grad(row_loss_of(coef)(
        reference.linear_token_logprobs(exact, weight, labels), 0, N), exact)
    torch.testing.assert_close(leaf.grad, want)
    assert entropy.numel() == 0 and weight.grad is None


def test_a_second_backward_is_refused_not_scaled_twice():
    hidden, weight, _, labels, coef = head_inputs(torch.float32, seed=6, with_bias=False)
    leaf = hidden.clone().requires_grad_()
    loss, _, _ = linear_logprobs_loss(leaf, weight, labels, row_loss_of(coef), [(0, N)])
    (2.0 * loss).backward(retain_graph=True)
    once = leaf.grad.clone()
    with pytest.raises(RuntimeError, match="backward ran a second time"):
        loss.backward()
    assert torch.equal(leaf.grad, once)


@pytest.mark.parametrize("bounds", [[(0, 10)], [(0, 10), (11, N)], [(1, N)], [(0, 12), (10, N)]])
def test_bounds_that_miss_or_repeat_rows_are_refused(bounds):
    hidden, weight, _, labels, coef = head_inputs(torch.float32, seed=1, with_bias=False)
    with pytest.raises(ValueError, match="bounds .* must cover the 23 rows"):
        linear_logprobs_loss(hidden, weight, labels, row_loss_of(coef), bounds)


B, T = 5, 7


def grpo_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    bias = torch.randn(V, generator=gen)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = (torch.rand(B, T, generator=gen) > 0.25).float()
    mask[2] = 0.0  # an empty row
    logp = reference.linear_token_logprobs(hidden, weight, ids, bias=bias)
    old = logp + 0.3 * torch.randn(B, T, generator=gen)
    ref = old + 0.2 * torch.randn(B, T, generator=gen)
    return dict(hidden=hidden, weight=weight, bias=bias, ids=ids, mask=mask, old=old, ref=ref,
                adv=torch.randn(B, generator=gen), is_ratio=torch.rand(B, T, generator=gen) + 0.5)


@pytest.mark.parametrize("loss_type, level, options", [
    ("grpo", "token", {}), ("dapo", "sequence", {"num_items_in_batch": 19}),
    ("bnpo", "sequence_token", {}), ("dr_grpo", "token", {"use_ref_model": False}),
    ("cispo", "token", {}), ("sapo", "token", {}), ("luspo", "sequence", {}),
    ("vespo", "token", {"dtype": torch.float64})])
def test_grpo_loss_takes_the_same_value_gradients_and_metrics_either_way(loss_type, level, options,
                                                                         monkeypatch):
    """fp32 (one case fp64) head, the gradients-in-forward path cut into chunks of two sequences
    (its byte target made small) against linear_token_logprobs then the loss."""
    x = grpo_inputs(seed=len(loss_type) + len(level))
    dtype = options.get("dtype", torch.float32)
    sequence_bytes = T * V * dtype.itemsize
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 2 * sequence_bytes)
    results = []
    for in_forward in (True, False):
        module = FusedLinearGRPOLoss(beta=0.04, epsilon_high=0.28, loss_type=loss_type,
                                     importance_sampling_level=level, max_completion_length=T,
                                     use_bias_correction_kl=True, return_stats=True,
                                     use_ref_model=options.get("use_ref_model", True),
                                     grads_in_forward=in_forward)
        leaves = [x[k].to(dtype).requires_grad_() for k in ("hidden", "weight", "bias")]
        assert module._rows_per_chunk(*leaves) == (2 if in_forward else None)
        loss, metrics = module(leaves[0], leaves[1], x["ids"], x["mask"], x["adv"],
                               bias=leaves[2], ref_per_token_logps=x["ref"],
                               old_per_token_logps=x["old"], vllm_is_ratio=x["is_ratio"],
                               num_items_in_batch=options.get("num_items_in_batch"))
        (2.0 * loss).backward()
        results.append((loss.detach(), metrics, [leaf.grad for leaf in leaves]))
    (loss, metrics, grads), (loss2, metrics2, grads2) = results
    # (an fp64 head's log-probs are fp32 on the Triton backend's path, fp64 on this one's)
    assert loss.dtype == loss2.dtype or dtype == torch.float64
    assert loss.item() == pytest.approx(loss2.item(), rel=1e-5, abs=1e-6)
    for name in metrics:
        assert metrics[name].item() == pytest.approx(metrics2[name].item(), rel=1e-5, abs=1e-6)
    for got, want in zip(grads, grads2):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max() + 1e-7


def test_grpo_loss_takes_the_recompute_path_where_a_sequence_does_not_fit(monkeypatch):
    x = grpo_inputs(seed=3)
    hidden = x["hidden"].clone().requires_grad_()
    auto = FusedLinearGRPOLoss(loss_type="grpo")
    assert auto._rows_per_chunk(hidden, x["weight"], None) == loss_module.CHUNK_BYTES // (T * V * 4)
    assert auto._rows_per_chunk(hidden.bfloat16(), x["weight"].bfloat16(), None) is None
    assert auto._rows_per_chunk(hidden, x["weight"].double(), None) is None  # mixed dtypes
    forced = FusedLinearGRPOLoss(loss_type="grpo", grads_in_forward=True)
    assert forced._rows_per_chunk(hidden.bfloat16(), x["weight"].bfloat16(), None) is not None
    with torch.no_grad():
        assert auto._rows_per_chunk(hidden, x["weight"], None) is None
    monkeypatch.setattr(loss_module, "MAX_CHUNK_BYTES", T * V * 4 - 1)
    assert auto._rows_per_chunk(hidden, x["weight"], None) is None
    with pytest.raises(TypeError, match="grads_in_forward must be a bool or None, got 'yes'"):
        FusedLinearGRPOLoss(grads_in_forward="yes")


@pytest.mark.parametrize("rows, steps", [(0, T), (B, 0)])
def test_an_empty_batch_gives_a_zero_loss_on_the_default_path(rows, steps):
    hidden = torch.randn(rows, steps, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    ids = torch.zeros(rows, steps, dtype=torch.int64)
    loss, _ = FusedLinearGRPOLoss(loss_type="grpo", beta=0.0)(
        hidden, weight, ids, torch.ones(rows, steps), torch.zeros(rows))
    loss.backward()
    assert loss.item() == 0.0 and weight.grad is not None and not weight.grad.any()


def test_bad_labels_and_options_are_refused_in_one_line_on_the_default_path():
    x = grpo_inputs(seed=4)
    hidden = x["hidden"].clone().requires_grad_()
    ids = x["ids"].clone()
    ids[0, 0] = V
    module = FusedLinearGRPOLoss(loss_type="grpo")
    assert module._rows_per_chunk(hidden, x["weight"], None) is not None
    with pytest.raises(ValueError, match="labels must be in"):
        module(hidden, x["weight"], ids, torch.ones(B, T), x["adv"], ref_per_token_logps=x["ref"])
    cold = FusedLinearGRPOLoss(loss_type="grpo", temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        cold(hidden, x["weight"], x["ids"], x["mask"], x["adv"], ref_per_token_logps=x["ref"])


def test_without_gradients_the_module_gives_the_same_loss():
    x = grpo_inputs(seed=8)
    module = FusedLinearGRPOLoss(loss_type="dapo")
    args = (x["ids"], x["mask"], x["adv"])
    with torch.no_grad():
        plain, _ = module(x["hidden"], x["weight"], *args, ref_per_token_logps=x["ref"])
    trained, _ = module(x["hidden"].clone().requires_grad_(), x["weight"], *args,
                        ref_per_token_logps=x["ref"])
    assert trained.requires_grad and not plain.requires_grad
    assert trained.item() == pytest.approx(plain.item(), rel=1e-5)
