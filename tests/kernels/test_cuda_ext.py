"""The optional CUDA extension around its kernels: loader, dispatch errors, setup.py's build
decision, and the C++ ops' registration (schemas, fake and autograd rules) on a CPU stand-in."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

import fusedrl.kernels as kernels
from fusedrl.kernels import cuda_ext, dispatch, use_backend
from fusedrl.kernels.triton_compat import TRITON_AVAILABLE
from kernel_testing import CUDA_EXT_RUNS, DEVICE, needs_triton

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MISSING = "backend 'cuda' is unavailable: fusedrl.kernels._C is not built"
without_extension = pytest.mark.skipif(cuda_ext.is_available(), reason="the extension is built here")


@without_extension
def test_loader_says_why_and_how_to_build():
    assert not cuda_ext.is_available()
    assert "fusedrl.kernels._C" in cuda_ext.unavailable_reason()
    with pytest.raises(RuntimeError, match=MISSING) as error:
        cuda_ext.require()
    assert "FUSEDRL_FORCE_CUDA_BUILD=1 python setup.py build_ext --inplace" in str(error.value)


@without_extension
def test_asking_for_cuda_without_the_extension_raises(monkeypatch):
    with pytest.raises(RuntimeError, match=MISSING):
        with use_backend("cuda"):
            pass
    monkeypatch.setenv("FUSEDRL_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=MISSING):
        kernels.kl_penalty(torch.zeros(3, device=DEVICE), torch.zeros(3, device=DEVICE))


@pytest.mark.skipif(not CUDA_EXT_RUNS, reason="needs a GPU and the built extension")
def test_cuda_backend_refuses_cpu_tensors():
    with use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors"):
        kernels.kl_penalty(torch.zeros(3), torch.zeros(3))


def test_auto_picks_by_the_measured_table(monkeypatch):
    monkeypatch.delenv("FUSEDRL_BACKEND", raising=False)
    # kernels/BACKENDS.md: CUDA at 256 x 2048 for every op with a CUDA kernel, Triton's gae and kl at 8192 x 2048
    pick = lambda op, n, **kw: dispatch.auto_backend(op, n, **{**dict(on_cuda=True, cuda_built=True,
                                                                       triton_ok=True), **kw})
    for op in ("token_logprobs", "gae", "kl_penalty", "ppo_policy_loss", "ppo_value_loss"):
        assert pick(op, 256 * 2048) == "cuda", op
    assert [pick(op, 8192 * 2048) for op in ("gae", "kl_penalty", "ppo_policy_loss", "ppo_value_loss")] == [
        "triton", "triton", "cuda", "cuda"]
    assert pick("masked_whiten", 256 * 2048) == pick(None, 10) == "triton"     # no CUDA kernel / no op named
    assert pick("gae", 10, cuda_built=False) == "triton" and pick("gae", 10, on_cuda=False) == "triton"
    assert pick("gae", 10, on_cuda=False, cuda_built=False, triton_ok=False) == "torch"
    if not CUDA_EXT_RUNS:   # here: never cuda
        assert kernels.backend_for(torch.zeros(1, device=DEVICE), "gae") in ("triton", "torch")


def test_cuda_runs_only_where_its_kernel_takes_the_ops_own_inputs():
    bf16, f32, f64 = (torch.zeros(2, dtype=dtype) for dtype in (torch.bfloat16, torch.float32, torch.float64))
    assert cuda_ext.takes(bf16, bf16) and cuda_ext.takes(f32)                 # one dtype the kernels load
    assert not cuda_ext.takes(bf16, f32) and not cuda_ext.takes(f64)          # no cast around the kernel
    fallback = "triton" if TRITON_AVAILABLE else "torch"
    assert cuda_ext.twin_or_fallback("cuda", bf16, bf16) == "cuda"
    assert cuda_ext.twin_or_fallback("cuda", bf16, f64) == fallback
    assert cuda_ext.twin_or_fallback("cuda", f32, supported=False) == fallback  # a mode the twin lacks
    assert cuda_ext.twin_or_fallback("triton", f64) == "triton" and cuda_ext.twin_or_fallback("torch", f64) == "torch"


def load_setup_module():
    """setup.py as a module: it calls setup() only when run as __main__."""
    spec = importlib.util.spec_from_file_location("fusedrl_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CUDA_TORCH = dict(torch_found=True, torch_cuda="13.0", nvcc="/usr/local/cuda/bin/nvcc")


@pytest.mark.parametrize("environ, detected, build, why", [
    ({}, CUDA_TORCH, True, "torch with CUDA 13.0"),
    ({}, dict(CUDA_TORCH, torch_cuda=None), False, "CPU-only build"),
    ({}, dict(CUDA_TORCH, nvcc=None), False, "nvcc not found"),
    ({}, dict(torch_found=False, torch_cuda=None, nvcc=None), False, "isolated build"),
    ({"FUSEDRL_SKIP_CUDA_BUILD": "1"}, CUDA_TORCH, False, "FUSEDRL_SKIP_CUDA_BUILD=1"),
    ({"FUSEDRL_FORCE_CUDA_BUILD": "1"}, dict(CUDA_TORCH, torch_cuda=None, nvcc=None), True,
     "FUSEDRL_FORCE_CUDA_BUILD=1"),
    ({"FUSEDRL_SKIP_CUDA_BUILD": "0", "FUSEDRL_FORCE_CUDA_BUILD": "0"}, CUDA_TORCH, True, "CUDA"),
])
def test_setup_build_decision(environ, detected, build, why):
    planned, reason = load_setup_module().plan_cuda_build(environ, **detected)
    assert planned == build and why in reason


def test_setup_build_decision_errors():
    plan = load_setup_module().plan_cuda_build
    with pytest.raises(ValueError, match="contradict"):
        plan({"FUSEDRL_SKIP_CUDA_BUILD": "1", "FUSEDRL_FORCE_CUDA_BUILD": "1"}, **CUDA_TORCH)
    with pytest.raises(RuntimeError, match="no-build-isolation"):
        plan({"FUSEDRL_FORCE_CUDA_BUILD": "1"}, torch_found=False, torch_cuda=None, nvcc=None)


def test_setup_skip_line_without_cuda_torch(capsys, monkeypatch):
    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA here: the extension would be built")
    for name in ("FUSEDRL_FORCE_CUDA_BUILD", "FUSEDRL_SKIP_CUDA_BUILD"):
        monkeypatch.delenv(name, raising=False)
    assert load_setup_module().cuda_build_options() == {}        # no ext_modules: pure Python
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith("fusedrl: skipping the CUDA extension fusedrl.kernels._C (torch is a CPU-only build)")


def binding_schemas() -> list[str]:
    """The op schemas csrc/binding.cpp defines (its m.def string literals, concatenated)."""
    source = open(os.path.join(ROOT, "csrc", "binding.cpp"), encoding="utf-8").read()
    return ["".join(re.findall(r'"([^"]*)"', call))
            for call in re.findall(r"m\.def\((.*?)\);", source, re.S)]


# The Triton op doing each C++ op's job where the names differ (the Triton losses and KL finalize,
# clamp and weight on the device, so they take other arguments).
TRITON_JOB = {"kl_penalty_fwd": "kl_penalty", "kl_penalty_bwd": "kl_penalty_grad",
              "ppo_policy_loss": "ppo_policy_loss_fwd", "ppo_value_loss": "ppo_value_loss_fwd"}


def test_every_cuda_op_has_a_triton_twin():
    names = [schema.split("(")[0] for schema in binding_schemas()]
    assert len(names) == 8 and all(name.startswith("cuda_") for name in names)
    for name in names:
        job = name.removeprefix("cuda_")
        assert hasattr(torch.ops.fusedrl, TRITON_JOB.get(job, job)), name


# Run in a fresh interpreter: defines the fusedrl library as binding.cpp's TORCH_LIBRARY does
# (a DEF next to the Python custom ops' FRAGMENTs), with CPU stand-ins calling the Triton twins,
# then registers the Python rules and checks values, gradients and a torch.compile trace.
STAND_IN = r"""
import sys, torch
sys.path[:0] = [{tests!r}, {tests!r} + "/kernels"]  # kernel_testing, test_cuda_ext
from fusedrl.kernels.rl import advantages, kl, logprobs, ppo_loss
from test_cuda_ext import binding_schemas
from fusedrl.kernels import reference
from fusedrl.kernels.rl.kl import _backward as kl_grad, _forward as kl_value

def loss_stand_in(terms):
    # A C++ loss op's contract from the reference: (loss, d loss / d x fp32 or [0], stats).
    def op(x, y, z, mask, weights, *args):
        *params, compute_grad = args
        per_token, d_per_token, stats = terms(x, y, z, mask, *params)
        row_weight = weights.view(*x.shape[:-1], 1)
        grad = torch.where(mask, d_per_token * row_weight, 0.0).float()
        loss = reference.weighted_sum(per_token, mask, weights).float()
        return loss, grad if compute_grad else x.new_empty(0), stats
    return op

def policy_terms(x, y, z, mask, low, high, dual_clip, log_ratio_clamp):
    loss, log_ratio, ratio, clipped, dual = reference.policy_terms(
        x, y, z, clip_low=low, clip_high=high, dual_clip=dual_clip if dual_clip > 0 else None,
        log_ratio_clamp=log_ratio_clamp)
    flat = clipped | dual | ((x - y).abs() > log_ratio_clamp)       # d(-A r) / d logp = -A r elsewhere
    means = [reference.masked_mean(v.float(), mask) for v in (clipped, dual, ratio - 1 - log_ratio, ratio)]
    return loss, torch.where(flat, 0.0, -z * ratio), torch.stack(means + [torch.where(mask, ratio, 0.0).max()])

def value_terms(x, y, z, mask, clip_eps):
    loss, clipped = reference.value_terms(x, y, z, clip_eps=clip_eps if clip_eps >= 0 else None)
    return loss, torch.where(clipped, 0.0, x - z), reference.masked_mean(clipped.float(), mask).reshape(1)

# The ops whose Triton side has another schema (it finalizes on the device) get reference stand-ins.
STAND_INS = dict(
    cuda_kl_penalty_fwd=lambda logp, ref, mask, est: kl_value(logp, ref, mask, est, 0.0, 0.0),
    cuda_kl_penalty_bwd=lambda g, logp, ref, mask, est: kl_grad(g, logp, ref, mask, est, 0.0, 0.0),
    cuda_ppo_policy_loss=loss_stand_in(policy_terms), cuda_ppo_value_loss=loss_stand_in(value_terms))
lib = torch.library.Library("fusedrl", "DEF")
for schema in binding_schemas():
    name = schema.split("(")[0]
    lib.define(schema)
    lib.impl(name, STAND_INS.get(name) or getattr(torch.ops.fusedrl, name.removeprefix("cuda_")), "CPU")
for module in (logprobs, kl, advantages, ppo_loss):
    module.register_cuda_rules()
ops = torch.ops.fusedrl

def step(logits, labels, logp_old, mask):
    logp, entropy, _ = ops.cuda_token_logprobs_fwd(logits, labels, 1.0, -100, True, False)
    logp, entropy = logp.view(mask.shape), entropy.view(mask.shape)
    kl_pen = ops.cuda_kl_penalty_fwd(logp, logp_old, mask, 2)
    adv, _ = ops.cuda_gae(-kl_pen.detach(), logp_old, mask, 1.0, 0.95)
    weights = ppo_loss.row_weights(mask, "token-mean")
    loss, _, stats = ops.cuda_ppo_policy_loss(logp, logp_old, adv, mask, weights, 0.2, 0.2, 0.0, 20.0, True)
    vloss, _, _ = ops.cuda_ppo_value_loss(logp, logp_old, adv, mask, weights, 0.2, True)
    return loss + vloss + kl_pen.sum() - entropy.sum(), stats

def run(fn):
    x = torch.randn(3, 5, 11).view(15, 11).requires_grad_()
    torch.manual_seed(0)
    inputs = (torch.randint(0, 11, (15,)), torch.randn(3, 5) - 2, torch.rand(3, 5) > 0.3)
    out, stats = fn(x, *inputs)
    out.backward()
    return out, stats, x.grad

torch.manual_seed(0)
eager = run(step)
torch.manual_seed(0)
compiled = run(torch.compile(step, backend="aot_eager", fullgraph=True))
for a, b in zip(eager, compiled):
    torch.testing.assert_close(a, b)
assert torch.isfinite(eager[2]).all() and eager[2].abs().sum() > 0
print("ok")
"""


@needs_triton
def test_cuda_op_registration_on_a_cpu_stand_in():
    if cuda_ext.is_available():
        pytest.skip("the real extension is loaded in this process's library")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", STAND_IN.format(tests=os.path.join(ROOT, "tests"))],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def rl_step(logits, labels, old_logp, values, mask):
    """Forward of every fused op, as a rollout / loss step calls them."""
    logp, entropy = kernels.token_logprobs(logits, labels, return_entropy=True)
    kl = kernels.kl_penalty(logp, old_logp, estimator="k3", mask=mask, clamp=10.0, log_ratio_clamp=20.0)
    advantages, returns = kernels.gae(-kl, values, mask)
    advantages = kernels.masked_whiten(advantages, mask)
    policy_loss, stats = kernels.ppo_policy_loss(logp, old_logp, advantages, mask, dual_clip=3.0)
    corrected_loss, cstats = kernels.ppo_policy_loss(logp, old_logp, advantages, mask, ratio_level="sequence",
                                                     is_mode="mis", rollout_logprobs=old_logp + 0.05)
    value_loss, vstats = kernels.ppo_value_loss(values, values + 0.1, returns, mask)
    return [logp, entropy, kl, advantages, returns, policy_loss, corrected_loss, value_loss, *stats.values(),
            *cstats.values(), *vstats.values()]


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_and_replay(fused_backend, monkeypatch):
    # Checks that read values (a host sync, which capture forbids) are off on CUDA by default.
    monkeypatch.delenv("FUSEDRL_SYNC_CHECKS", raising=False)
    B, T, V = 3, 70, 1000
    inputs = [torch.randn(B, T, V, device=DEVICE, dtype=torch.bfloat16),
              torch.randint(0, V, (B, T), device=DEVICE), torch.randn(B, T, device=DEVICE) - 7,
              torch.randn(B, T, device=DEVICE), torch.rand(B, T, device=DEVICE) > 0.2]
    with use_backend(fused_backend), torch.no_grad():
        expected = rl_step(*inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                   # warm-up (Triton compiles) off-graph
            rl_step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = rl_step(*inputs)
        graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, expected):
        assert torch.equal(got, want)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_captures_the_losses_backward(fused_backend):
    B, T = 4, 300
    logp = (torch.randn(B, T, device=DEVICE) - 2).requires_grad_()
    values = torch.randn(B, T, device=DEVICE).requires_grad_()
    old, adv, returns = (torch.randn(B, T, device=DEVICE) for _ in range(3))
    rollout, mask = old + 0.1 * torch.randn(B, T, device=DEVICE), torch.rand(B, T, device=DEVICE) > 0.2

    def step():
        policy, _ = kernels.ppo_policy_loss(logp, old, adv, mask, is_mode="tis", rollout_logprobs=rollout)
        value, _ = kernels.ppo_value_loss(values, old, returns, mask)
        kl = kernels.kl_penalty(logp, old, estimator="k3", mask=mask, clamp=10.0)
        return torch.autograd.grad(policy + value + kl.sum(), (logp, values))

    with use_backend(fused_backend):
        expected = step()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                   # warm-up (Triton compiles) off-graph
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, expected):
        assert torch.equal(got, want)
