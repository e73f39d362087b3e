"""Backend selection (use_backend, FUSEDRL_BACKEND, auto) and torch.compile tracing."""
import pytest
import torch

import fusedrl.kernels as kernels
from fusedrl.kernels import attention_backend, backend_for, fused_for_model, model_backend, use_backend
from kernel_testing import DEVICE, ON_GPU, TRITON_RUNS, assert_close, needs_triton


def test_auto_picks_triton_where_it_runs(monkeypatch):
    monkeypatch.delenv("FUSEDRL_BACKEND", raising=False)
    x = torch.zeros(1, device=DEVICE)
    assert backend_for(x) == ("triton" if TRITON_RUNS else "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend_for(torch.zeros(1)) == "torch"


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv("FUSEDRL_BACKEND", raising=False)
    x = torch.zeros(1, device=DEVICE)
    auto = backend_for(x)
    with use_backend("torch"):
        assert backend_for(x) == "torch"
        with use_backend("auto"):
            assert backend_for(x) == auto
        assert backend_for(x) == "torch"
    assert backend_for(x) == auto


def test_environment_override(monkeypatch):
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    assert backend_for(torch.zeros(1, device=DEVICE)) == "torch"
    with use_backend("auto"):                     # the context manager wins over the variable
        assert backend_for(torch.zeros(1, device=DEVICE)) == ("triton" if TRITON_RUNS else "torch")
    monkeypatch.setenv("FUSEDRL_BACKEND", "cuda-graphs")
    with pytest.raises(ValueError, match="FUSEDRL_BACKEND: unknown backend 'cuda-graphs'"):
        backend_for(torch.zeros(1))


@needs_triton
def test_model_paths_ask_the_same_decider_but_interpret_only_by_name(monkeypatch):
    """fused_for_model is backend_for's choice, except that "auto" never sends CPU tensors to the
    interpreter (a whole forward there takes minutes): CUDA tensors run fused, CPU ones by name."""
    monkeypatch.delenv("FUSEDRL_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.zeros(1)
    assert backend_for(cpu) == "triton" and not fused_for_model(cpu)
    with use_backend("triton"):
        assert fused_for_model(cpu)
    with use_backend("torch"):
        assert not fused_for_model(cpu)
    if ON_GPU:
        gpu = torch.zeros(1, device=DEVICE)
        assert fused_for_model(gpu)
        with use_backend("torch"):
            assert not fused_for_model(gpu)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="use_backend: unknown backend 'fast'"):
        with use_backend("fast"):
            pass


@pytest.mark.skipif(ON_GPU, reason="checks the CPU-without-interpreter case")
def test_triton_refused_on_cpu_without_interpreter(monkeypatch, fused_backend):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend(fused_backend), pytest.raises(RuntimeError, match="needs CUDA tensors or TRITON_INTERPRET=1"):
        kernels.kl_penalty(torch.zeros(3), torch.zeros(3))


@needs_triton
def test_backends_agree(fused_backend):
    logits = torch.randn(4, 6, 33, device=DEVICE)
    labels = torch.randint(0, 33, (4, 6), device=DEVICE)
    with use_backend(fused_backend):
        fused = kernels.token_logprobs(logits, labels, return_entropy=True)
    with use_backend("torch"):
        plain = kernels.token_logprobs(logits, labels, return_entropy=True)
    for a, b in zip(fused, plain):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def ppo_step(logits, labels, hidden, head, rewards, values, mask):
    """A PPO-shaped use of every op, as a model's training step would call them."""
    logp, entropy = kernels.token_logprobs(logits, labels, return_entropy=True)
    ref_logp = kernels.linear_token_logprobs(hidden, head, labels.reshape(-1)).view_as(logp)
    kl = kernels.kl_penalty(logp, ref_logp.detach(), estimator="k3", mask=mask, clamp=10.0, log_ratio_clamp=20.0)
    advantages, returns = kernels.gae(rewards - 0.1 * kl.detach(), values.detach(), mask)
    advantages = kernels.masked_whiten(advantages, mask)
    policy_loss, stats = kernels.ppo_policy_loss(logp, logp.detach() - 0.05, advantages, mask)
    corrected_loss, corrected = kernels.ppo_policy_loss(
        logp, logp.detach() - 0.05, advantages, mask, ratio_level="sequence", is_mode="tis", is_level="sequence",
        rollout_logprobs=logp.detach() - 0.02)
    value_loss, _ = kernels.ppo_value_loss(values, values.detach() + 0.1, returns, mask)
    loss = policy_loss + corrected_loss + 0.5 * value_loss + kl.mean() - 0.01 * entropy.mean() + ref_logp.mean()
    return loss, stats["clipfrac"] + corrected["is_weight_mean"]


@needs_triton
@pytest.mark.parametrize("compiler", ["aot_eager"] + (["inductor"] if ON_GPU else []))
def test_torch_compile_traces_without_graph_breaks(compiler, fused_backend):
    torch._dynamo.reset()
    B, T, V, H = 3, 5, 40, 8
    inputs = [torch.randn(B, T, V, device=DEVICE), torch.randint(0, V, (B, T), device=DEVICE),
              torch.randn(B * T, H, device=DEVICE), torch.randn(V, H, device=DEVICE),
              torch.randn(B, T, device=DEVICE), torch.randn(B, T, device=DEVICE),
              torch.rand(B, T, device=DEVICE) > 0.2]
    differentiable = [0, 2, 3, 5]

    def run(fn):
        args = [x.clone().requires_grad_() if i in differentiable else x for i, x in enumerate(inputs)]
        loss, clipfrac = fn(*args)
        loss.backward()
        return [loss, clipfrac] + [args[i].grad for i in differentiable]

    with use_backend(fused_backend):
        eager = run(ppo_step)
        compiled = run(torch.compile(ppo_step, fullgraph=True, backend=compiler))  # raises on a break
    for a, b in zip(compiled, eager):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_triton
def test_model_backend_is_triton_or_torch(monkeypatch):
    monkeypatch.delenv("FUSEDRL_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.zeros(1)
    assert model_backend(cpu) == "torch"
    with use_backend("triton"):
        assert model_backend(cpu) == "triton"
    if ON_GPU:
        assert model_backend(torch.zeros(1, device=DEVICE)) == "triton"


def test_attention_backend(monkeypatch):
    """No flash kernel serves CPU or fp32 queries: padded SDPA for the forward's own keys, the model
    backend for keys read from pages. On CUDA in bf16 a varlen flash kernel serves a pack, and our
    decode kernel pages flash-attn cannot read (a page of 16 is not a multiple of 256)."""
    monkeypatch.delenv("FUSEDRL_BACKEND", raising=False)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.zeros(2, 4, 8, dtype=dtype)
        assert attention_backend(q) == "torch"
        assert attention_backend(q, 256) == model_backend(q)
        with use_backend("torch"):
            assert attention_backend(q, 256) == "torch"
    if ON_GPU:
        q = torch.zeros(2, 4, 8, dtype=torch.bfloat16, device=DEVICE)
        assert attention_backend(q) in ("flash_attn", "torch_varlen")
        assert attention_backend(q, 16) == "triton"
        assert attention_backend(q.float()) == "torch"
        # heads of 12 (the distillation demo's student): torch's varlen entry refuses them
        assert attention_backend(torch.zeros(2, 4, 12, dtype=torch.bfloat16, device=DEVICE)) == "torch"


@pytest.mark.gpu
def test_value_checks_are_off_inside_a_graph_capture_whatever_the_environment(monkeypatch):
    """FUSEDRL_SYNC_CHECKS=1 turns the value-reading checks on for CUDA tensors, but not while a
    CUDA graph captures: a host read there would fail the capture (the LM head's label check in a
    captured training forward)."""
    from fusedrl.kernels.dispatch import sync_checks_enabled
    monkeypatch.setenv("FUSEDRL_SYNC_CHECKS", "1")
    x = torch.zeros(4, device="cuda")
    assert sync_checks_enabled(x)
    seen = []
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seen.append(sync_checks_enabled(x))
        x.add_(1)
    graph.replay()
    assert seen == [False] and sync_checks_enabled(x)


def test_value_checks_of_a_tensor_off_the_cpu_follow_the_environment_on_any_build(monkeypatch):
    """A meta tensor stands for a device's: checks off unless FUSEDRL_SYNC_CHECKS=1, and asking
    whether a CUDA stream captures only for a CUDA tensor (a CPU-only build has no CUDA streams
    to ask about)."""
    from fusedrl.kernels.dispatch import sync_checks_enabled
    x = torch.empty(3, device="meta")
    monkeypatch.delenv("FUSEDRL_SYNC_CHECKS", raising=False)
    assert not sync_checks_enabled(x)
    monkeypatch.setenv("FUSEDRL_SYNC_CHECKS", "1")
    assert sync_checks_enabled(x)
    assert sync_checks_enabled(torch.empty(3))  # the CPU's: always
