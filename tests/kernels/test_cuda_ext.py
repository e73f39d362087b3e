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
from fusedrl.kernels import cuda_ext, use_backend
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


def test_auto_never_picks_cuda(monkeypatch):
    # Until the GPU benchmark decides otherwise (kernels/BACKENDS.md).
    monkeypatch.delenv("FUSEDRL_BACKEND", raising=False)
    assert kernels.backend_for(torch.zeros(1, device=DEVICE)) in ("triton", "torch")


def test_cuda_kernels_get_one_dtype_per_op():
    from fusedrl.kernels.dispatch import kernel_inputs
    bf16, f64 = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.float64)
    assert kernel_inputs("cuda", bf16, bf16) == (bf16, bf16)                  # passed through
    assert [t.dtype for t in kernel_inputs("cuda", bf16, f64)] == [torch.float32] * 2
    assert [t.dtype for t in kernel_inputs("cuda", f64)] == [torch.float32]
    assert kernel_inputs("triton", bf16, f64) == (bf16, f64)                 # Triton loads any


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


def test_every_cuda_op_has_a_triton_twin():
    names = [schema.split("(")[0] for schema in binding_schemas()]
    assert len(names) == 8 and all(name.startswith("cuda_") for name in names)
    for name in names:
        assert hasattr(torch.ops.fusedrl, name.removeprefix("cuda_")), name


# Run in a fresh interpreter: defines the fusedrl library as binding.cpp's TORCH_LIBRARY does
# (a DEF next to the Python custom ops' FRAGMENTs), with CPU stand-ins calling the Triton twins,
# then registers the Python rules and checks values, gradients and a torch.compile trace.
STAND_IN = r"""
import sys, torch
sys.path[:0] = [{tests!r}, {tests!r} + "/kernels"]  # kernel_testing, test_cuda_ext
from fusedrl.kernels import advantages, kl, logprobs, ppo_loss
from test_cuda_ext import binding_schemas
lib = torch.library.Library("fusedrl", "DEF")
for schema in binding_schemas():
    name = schema.split("(")[0]
    lib.define(schema)
    lib.impl(name, getattr(torch.ops.fusedrl, name.removeprefix("cuda_")), "CPU")
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
    """Forward of every fused op with a CUDA kernel, as a rollout / loss step calls them."""
    logp, entropy = kernels.token_logprobs(logits, labels, return_entropy=True)
    kl = kernels.kl_penalty(logp, old_logp, estimator="k3", mask=mask)
    advantages, returns = kernels.gae(-kl, values, mask)
    policy_loss, stats = kernels.ppo_policy_loss(logp, old_logp, advantages, mask, dual_clip=3.0)
    value_loss, vstats = kernels.ppo_value_loss(values, values + 0.1, returns, mask)
    return [logp, entropy, kl, advantages, returns, policy_loss, value_loss, *stats.values(),
            *vstats.values()]


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_and_replay(fused_backend, monkeypatch):
    # The label-range check reads values (a host sync), which capture forbids.
    monkeypatch.setenv("FUSEDRL_SKIP_SYNC_CHECKS", "1")
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
