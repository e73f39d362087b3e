"""bf16-mixed training: MixedPrecisionAdamW's fp32 masters, the precision switch, PPO in bf16."""
import pytest
import torch

from fusedrl.engine.train.precision import MixedPrecisionAdamW, param_dtype, resolve_precision


def adamw_pair(dtype):
    torch.manual_seed(0)
    init = torch.randn(5, 3).to(dtype)
    ours = torch.nn.Parameter(init.clone())
    ref = torch.nn.Parameter(init.float())   # the fp32 trajectory from the same start
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    return ours, ref, MixedPrecisionAdamW([ours], **kwargs), torch.optim.AdamW([ref], foreach=False, **kwargs)


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
    opt = MixedPrecisionAdamW([weight], lr=1e-4, weight_decay=0.0)
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
    resumed = MixedPrecisionAdamW([clone], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
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
