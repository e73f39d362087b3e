"""bf16-mixed training: FusedAdamW's fp32 masters (against torch's AdamW), clipping and skipping on the
device, resume, the precision switch."""
import pytest
import torch

from fusedrl.engine.train.fused_adamw import FusedAdamW
from fusedrl.engine.train.optim import clip_and_step
from fusedrl.engine.train.precision import param_dtype, resolve_precision


def adamw_pair(dtype):
    torch.manual_seed(0)
    init = torch.randn(5, 3).to(dtype)
    ours = torch.nn.Parameter(init.clone())
    ref = torch.nn.Parameter(init.float())   # the fp32 trajectory from the same start
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    return ours, ref, FusedAdamW([ours], **kwargs), torch.optim.AdamW([ref], foreach=False, **kwargs)


def test_fp32_parameters_follow_torch_adamw():
    ours, ref, opt, ref_opt = adamw_pair(torch.float32)
    for _ in range(5):
        grad = torch.randn(5, 3)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.data, ref.data, atol=1e-6, rtol=1e-6)


def test_bf16_parameters_are_the_rounded_fp32_masters():
    ours, ref, opt, ref_opt = adamw_pair(torch.bfloat16)
    for _ in range(5):
        grad = torch.randn(5, 3)
        ours.grad, ref.grad = grad.to(torch.bfloat16), grad.to(torch.bfloat16).float()
        opt.step()
        ref_opt.step()
    master = opt.state[ours]["master"]
    assert ours.dtype == torch.bfloat16 and master.dtype == torch.float32
    torch.testing.assert_close(master, ref.data, atol=1e-6, rtol=1e-6)   # the fp32 trajectory itself
    assert torch.equal(ours.data, master.to(torch.bfloat16))


def test_updates_below_bf16_resolution_accumulate():
    # Adam moves each weight by about lr per step: 1e-4, below bf16's spacing 2**-7 at 1.0. Plain
    # AdamW on bf16 weights rounds every step back to 1.0; the fp32 master walks down to ~0.98.
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    plain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = FusedAdamW([weight], lr=1e-4, weight_decay=0.0)
    plain_opt = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    storage = weight.data_ptr()
    for _ in range(200):
        weight.grad = torch.ones(4, dtype=torch.bfloat16)
        plain.grad = torch.ones(4, dtype=torch.bfloat16)
        opt.step()
        plain_opt.step()
    assert torch.equal(plain.data, torch.ones(4, dtype=torch.bfloat16))
    assert opt.state[weight]["master"][0].item() == pytest.approx(1 - 200 * 1e-4, abs=1e-4)
    assert weight.data[0].item() == pytest.approx(0.98, abs=2 ** -7) and weight.data_ptr() == storage


def test_state_dict_round_trip_resumes_exactly():
    ours, _, opt, _ = adamw_pair(torch.bfloat16)
    ours.grad = torch.randn(5, 3, dtype=torch.bfloat16)
    opt.step()
    clone = torch.nn.Parameter(ours.data.clone())
    resumed = FusedAdamW([clone], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    resumed.load_state_dict(opt.state_dict())
    grad = torch.randn(5, 3, dtype=torch.bfloat16)
    ours.grad, clone.grad = grad, grad.clone()
    opt.step()
    resumed.step()
    assert torch.equal(opt.state[ours]["master"], resumed.state[clone]["master"]) and torch.equal(ours, clone)


def test_precision_resolution():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16-mixed"
    assert param_dtype("bf16-mixed") == torch.bfloat16 and param_dtype("fp32") == torch.float32
    with pytest.raises(ValueError, match="train.precision must be one of"):
        resolve_precision("fp16", torch.device("cpu"))


def model_pair(n_tensors=12, seed=0):
    """bf16 matrices and vectors plus one fp32 head (as a policy with its value head), and fp32 copies."""
    torch.manual_seed(seed)
    shapes = [(7, 3) if i % 3 else (5,) for i in range(n_tensors)]
    ours = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in shapes]
    ours.append(torch.nn.Parameter(torch.randn(2, 7)))   # fp32: its own master
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in ours]

    return ours, ref, FusedAdamW(groups(ours), **ADAMW), torch.optim.AdamW(groups(ref), foreach=False, **ADAMW)


ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def groups(params):
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def masters(opt, params):
    return [opt.state[p]["master"] if "master" in opt.state[p] else p.detach() for p in params]


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_clipped_steps_follow_torch_adamw_in_fp32(max_grad_norm):
    ours, ref, opt, ref_opt = model_pair()
    for step in range(6):
        for p, r in zip(ours, ref):
            grad = (3 * torch.randn(p.shape)).to(p.dtype)
            p.grad, r.grad = grad, grad.float()
        norm = clip_and_step([opt], max_grad_norm)[0]
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_grad_norm if max_grad_norm else float("inf"))
        ref_opt.step()
        # The same upcast gradients, summed in fp64 (ours) and fp32 (torch).
        torch.testing.assert_close(norm.float(), ref_norm, rtol=1e-6, atol=0)
    # fp32 AdamW in another operation order (the fused kernel's), plus the clip as a division by
    # norm / max instead of torch's multiplication by max / (norm + 1e-6): a few ulps per step,
    # far below the update itself (lr = 1e-2).
    for master, r in zip(masters(opt, ours), ref):
        torch.testing.assert_close(master, r.detach(), rtol=1e-5, atol=1e-6)
    for p, master in zip(ours, masters(opt, ours)):
        assert torch.equal(p.detach(), master.to(p.dtype))   # the parameter is its rounded master


def snapshot(opt, params):
    return [t.clone() for p in params for t in (p.detach(), *opt.state[p].values())]


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_a_non_finite_loss_or_gradient_skips_the_step_on_the_device(bad):
    ours, _, opt, _ = model_pair()
    for p in ours:
        p.grad = torch.randn(p.shape).to(p.dtype)
    clip_and_step([opt], 1.0, torch.tensor(0.5))
    before = snapshot(opt, ours)
    for p in ours:
        p.grad = torch.randn(p.shape).to(p.dtype)
    loss = torch.tensor(float("nan") if bad == "loss" else 0.5)
    if bad == "grad":
        ours[3].grad[0] = float("inf")
    norm = clip_and_step([opt], 1.0, loss)[0]
    assert (bad == "loss") == bool(torch.isfinite(norm))
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(opt, ours)))   # steps included


def test_a_checkpoint_of_the_per_tensor_optimizer_resumes_exactly():
    # The former MixedPrecisionAdamW saved `step` as an int; everything else is the same state.
    ours, _, opt, _ = model_pair()
    for p in ours:
        p.grad = torch.randn(p.shape).to(p.dtype)
    opt.step()
    saved = opt.state_dict()
    saved["state"] = {k: {**v, "step": int(v["step"])} for k, v in saved["state"].items()}
    clones = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    resumed = FusedAdamW(groups(clones), **ADAMW)
    resumed.load_state_dict(saved)
    for p, c in zip(ours, clones):
        p.grad = torch.randn(p.shape).to(p.dtype)
        c.grad = p.grad.clone()
    clip_and_step([opt], 1.0)
    clip_and_step([resumed], 1.0)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(opt, ours), snapshot(resumed, clones)))


@pytest.mark.parametrize("scale", [1.0, 1e-8])
def test_clipped_steps_follow_adamw_written_out_in_float64(scale):
    # AdamW's math, not torch's code: decoupled decay on the weight, bias-corrected moments, eps
    # outside the square root and after the correction, the gradient clipped by the global norm
    # first. At scale 1e-8 eps (1e-8) rivals sqrt(v), so a misplaced eps would show; at scale 1 the
    # clip is active (norm ~9 against 1).
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(7, 3), (5,), (2, 7)]]
    ref = [p.detach().double().clone() for p in params]
    opt = FusedAdamW(groups(params), **ADAMW)
    beta1, beta2 = ADAMW["betas"]
    m, v = [torch.zeros_like(r) for r in ref], [torch.zeros_like(r) for r in ref]
    for t in range(1, 21):
        grads = [scale * 3 * torch.randn(p.shape) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        clip_and_step([opt], 1.0)
        g64 = [g.double() for g in grads]
        clip = max(torch.sqrt(sum((g * g).sum() for g in g64)).item() / 1.0, 1.0)
        for i, (r, g) in enumerate(zip(ref, g64)):
            g = g / clip
            r.mul_(1 - ADAMW["lr"] * (0.1 if r.dim() >= 2 else 0.0))
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            denom = (v[i] / (1 - beta2 ** t)).sqrt() + ADAMW["eps"]
            r.sub_(ADAMW["lr"] * (m[i] / (1 - beta1 ** t)) / denom)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)
