"""patch_model / patch_model_type on tiny transformers models built in code (Llama, Mistral, Qwen2,
Qwen3, Qwen3-MoE, Mixtral): the patched forward and gradients are the unpatched model's, the
forward with labels gives log_softmax(logits).gather without logits, every op has its switch, and
patching is local (patch_model) or undone (unpatch_model_type). On a CPU the kernels run in the
Triton interpreter (tests/conftest.py)."""
import copy

import pytest
import torch
import transformers

from fusedrl.kernels.integrations import (MODEL_TYPES, patch_model, patch_model_type,
                                          unpatch_model, unpatch_model_type)
from fusedrl.kernels.model import norm, rotary, swiglu
from fusedrl.kernels.rl import linear_logprobs
from fusedrl.kernels.integrations import hf_forwards
from kernel_testing import needs_triton

pytestmark = needs_triton

VOCAB = 61
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5)
CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 24, "decoder_sparse_step": 1, "mlp_only_layers": [1],
                   "num_hidden_layers": 2}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def tiny(model_type: str, **overrides):
    config_name, model_name, extra = CONFIGS[model_type]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    config._attn_implementation = "eager"
    return getattr(transformers, model_name)(config).float().eval()


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(reference, patched, atol=1e-5):
    ref, got = grads(reference), grads(patched)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=atol, msg=name)


@pytest.fixture
def calls(monkeypatch):
    """How often each of our kernels' entry points ran (they run as well)."""
    counts = {}
    for owner, name in ((norm, "rms_norm"), (rotary, "rope"), (swiglu, "silu_mul"),
                        (hf_forwards, "linear_token_logprobs")):
        original = getattr(owner, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)
    return counts


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_forward_and_gradients_match_the_unpatched_model(model_type, calls):
    reference = tiny(model_type)
    patched = patch_model(copy.deepcopy(reference))
    ids = torch.randint(0, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    want, got = reference(ids, attention_mask=mask).logits, patched(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(want)
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    assert_same_grads(reference, patched)
    layers = reference.config.num_hidden_layers
    norms = 2 * layers + 1 + (2 * layers if model_type.startswith("qwen3") else 0)  # q, k norms
    assert calls["rms_norm"] == norms and calls["rope"] == layers
    dense_mlps = {"qwen3_moe": 1, "mixtral": 0}.get(model_type, layers)  # fused experts stay HF's
    assert calls.get("silu_mul", 0) >= dense_mlps


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3_moe"])
def test_labels_give_logprobs_entropy_and_the_loss_without_logits(model_type):
    reference = tiny(model_type)
    patched = patch_model(copy.deepcopy(reference))
    ids = torch.randint(0, VOCAB, (3, 6))
    labels = ids.clone()
    labels[0, 2] = labels[2, 5] = -100
    out = patched(ids, labels=labels)
    assert out.logits is None and out.logprobs.shape == out.entropy.shape == ids.shape
    logits = reference(ids).logits
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    log_probs = torch.log_softmax(logits.double(), -1)
    kept = targets != -100
    want = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * kept
    entropy = -(log_probs.exp() * log_probs).sum(-1) * kept
    torch.testing.assert_close(out.logprobs.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), entropy, rtol=1e-5, atol=1e-5)
    want_loss = reference(ids, labels=labels).loss
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-5, atol=1e-6)
    want_loss.backward()
    out.loss.backward()
    assert_same_grads(reference, patched)
    shifted = patched(ids, shift_labels=targets, num_items_in_batch=torch.tensor(4))
    torch.testing.assert_close(shifted.logprobs, out.logprobs)
    torch.testing.assert_close(shifted.loss, -out.logprobs.sum() / 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_rotary_matches_transformers_in_both_layouts(unsqueeze_dim, dtype):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb
    batch, length, dim = 2, 5, 8
    shape = (lambda heads: (batch, heads, length, dim) if unsqueeze_dim == 1
             else (batch, length, heads, dim))
    q, k = torch.randn(shape(4)).to(dtype), torch.randn(shape(2)).to(dtype)
    angles = torch.rand(batch, length, dim // 2) * 6.3
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    for c, s in ((cos, sin), (cos[:1], sin[:1])):  # per row, and one row for the batch
        want = apply_rotary_pos_emb(q.double(), k.double(), c.double(), s.double(),
                                    unsqueeze_dim=unsqueeze_dim)
        got = hf_forwards.apply_rotary_pos_emb(q, k, c.to(dtype), s.to(dtype),
                                               unsqueeze_dim=unsqueeze_dim)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == dtype
            torch.testing.assert_close(g.double(), w, rtol=tolerance, atol=tolerance)


def test_a_bf16_model_stays_within_bf16_rounding_of_the_unpatched_one():
    reference = tiny("qwen2").to(torch.bfloat16)
    patched = patch_model(copy.deepcopy(reference))
    exact = tiny("qwen2").double()
    exact.load_state_dict(reference.state_dict())
    ids = torch.randint(0, VOCAB, (2, 6))
    want = exact(ids).logits
    for model in (reference, patched):  # ours is as close to float64 as transformers' bf16 is
        error = (model(ids).logits.double() - want).abs().max()
        assert error < 0.05, error
    out, full = patched(ids, labels=ids), exact(ids, labels=ids)
    assert out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), full.loss.double(), rtol=2e-2, atol=2e-2)


def test_generation_with_the_cache_and_sdpa_is_unchanged():
    reference = tiny("qwen2")
    reference.config._attn_implementation = "sdpa"
    patched = patch_model(copy.deepcopy(reference))
    ids = torch.randint(0, VOCAB, (1, 5))
    want = reference.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(patched.generate(ids, max_new_tokens=3, do_sample=False), want)


def test_a_mixture_of_experts_adds_its_router_loss():
    reference = tiny("mixtral", output_router_logits=True, router_aux_loss_coef=0.5)
    patched = patch_model(copy.deepcopy(reference))
    ids = torch.randint(0, VOCAB, (2, 5))
    want, got = reference(ids, labels=ids), patched(ids, labels=ids)
    torch.testing.assert_close(got.aux_loss, want.aux_loss)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)


def test_switches_pick_the_ops_and_patching_is_local(calls):
    model, other = tiny("qwen3"), tiny("qwen3")
    patch_model(model, rms_norm=False, rope=True, swiglu=False, lm_head=False)
    ids = torch.randint(0, VOCAB, (1, 4))
    model(ids, labels=ids)
    other(ids, labels=ids)
    assert calls == {"rope": model.config.num_hidden_layers}
    patch_model(model, rope=False)  # a second call sets exactly its own switches
    calls.clear()
    model(ids, labels=ids)
    assert set(calls) == {"rms_norm", "silu_mul", "linear_token_logprobs"}
    unpatch_model(model)
    assert not any("forward" in vars(module) for module in model.modules())


def test_patch_model_type_patches_the_classes_until_undone(calls):
    from transformers.models.qwen2 import modeling_qwen2
    originals = (modeling_qwen2.Qwen2RMSNorm.forward, modeling_qwen2.apply_rotary_pos_emb)
    reference = tiny("qwen2")
    try:
        patch_model_type("qwen2", swiglu=False)
        patched = copy.deepcopy(reference)
        ids = torch.randint(0, VOCAB, (2, 5))
        out = patched(ids, labels=ids)
        assert out.logits is None and "silu_mul" not in calls
        assert calls["rope"] == reference.config.num_hidden_layers
    finally:
        unpatch_model_type("qwen2")
    assert (modeling_qwen2.Qwen2RMSNorm.forward, modeling_qwen2.apply_rotary_pos_emb) == originals
    calls.clear()
    reference(ids)
    assert calls == {}


def test_the_patched_model_compiles():
    reference = tiny("qwen2")
    patched = patch_model(copy.deepcopy(reference))
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=False)
    ids = torch.randint(0, VOCAB, (2, 6))
    want, got = reference(ids, labels=ids), compiled(ids, labels=ids)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    want.loss.backward()
    got.loss.backward()
    assert_same_grads(reference, patched)


def test_unsupported_models_are_refused_by_name():
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        patch_model(transformers.GPT2LMHeadModel(config))
    with pytest.raises(ValueError, match="model_type: 'gpt2' is not supported"):
        patch_model_type("gpt2")

