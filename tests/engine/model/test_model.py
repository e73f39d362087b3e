"""The decoder against transformers: logits, packed training forward, checkpoint I/O and its errors."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from fusedrl.engine.data.packing import pack_sequences
from fusedrl.engine.model.hf_io import load_model, save_model
from fusedrl.engine.model.hf_io import INDEX_FILE, SINGLE_FILE
from fusedrl.engine.model.causal_lm import CausalLM
from fusedrl.engine.model.config import ModelConfig
from fusedrl.kernels import linear_token_logprobs, use_backend
from engine_testing import ARCHS, VOCAB, make_hf_model, random_prompts
from kernel_testing import DEVICE, ON_GPU, needs_triton

# fp32 on CPU: both sides do the same ops in the same order; what differs is matmul blocking and
# SDPA kernels, which moves logits by a few ulps of their magnitude (~1), so 1e-5 is tight yet robust.
ATOL = 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(model_dirs, arch):
    path, hf = model_dirs[arch]
    model = load_model(path, dtype="float32")
    ids = torch.tensor(random_prompts([50])[0])
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
        actual = model.compute_logits(model.forward_packed(ids, [50]))
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_packed_forward_restarts_positions_and_isolates_sequences(model_dirs, arch):
    path, hf = model_dirs[arch]
    model = load_model(path)
    prompts = random_prompts([7, 30, 1, 19], seed=1)
    packed = torch.tensor(sum(prompts, []))
    with torch.no_grad():
        hidden = model.forward_packed(packed, [len(p) for p in prompts])
        logits = model.compute_logits(hidden).split([len(p) for p in prompts])
        for p, got in zip(prompts, logits):
            torch.testing.assert_close(got, hf(torch.tensor([p])).logits[0], atol=ATOL, rtol=0)


def test_packed_forward_takes_the_pack_s_positions_and_boundaries(model_dirs):
    """A PackedBatch's positions and cu_seqlens, built once per pack, give the forward's own."""
    model = load_model(model_dirs["qwen2"][0])
    prompts = random_prompts([9, 4, 13], seed=7)
    packed = pack_sequences([(p[:2], p[2:], True) for p in prompts])
    assert packed.positions.tolist() == [i for p in prompts for i in range(len(p))]
    assert packed.cu_seqlens.tolist() == [0, 9, 13, 26]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_packed(packed.input_ids, packed.seqlens, packed.positions,
                                                        packed.cu_seqlens),
                                   model.forward_packed(packed.input_ids, packed.seqlens), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"positions is \(25,\) on cpu: expected \(26,\) on cpu"):
        model.forward_packed(packed.input_ids, packed.seqlens, packed.positions[1:])


def test_packed_hidden_states_feed_linear_token_logprobs(model_dirs):
    """The trainer's path: packed forward -> kernels.linear_token_logprobs(hidden, lm_head, labels),
    against transformers' log-probs of the same next tokens, with gradients reaching the model."""
    path, hf = model_dirs["llama"]
    model = load_model(path)
    prompts = random_prompts([9, 4, 13], seed=7)
    ids = torch.tensor(sum(prompts, []))
    # Next-token labels inside each sequence; the last token of each has none (ignore_index).
    labels = torch.cat([torch.tensor(p[1:] + [-100]) for p in prompts])
    hidden = model.forward_packed(ids, [len(p) for p in prompts])
    with use_backend("torch"):  # the kernel itself is the kernels package's to test
        logp = linear_token_logprobs(hidden, model.lm_head.weight, labels)
    with torch.no_grad():
        expected = torch.cat([
            torch.log_softmax(hf(torch.tensor([p])).logits[0, :-1], -1).gather(-1, torch.tensor(p[1:])[:, None])[:, 0]
            for p in prompts])
    torch.testing.assert_close(logp[labels != -100], expected, atol=ATOL, rtol=0)
    assert (logp[labels == -100] == 0).all()
    logp.sum().backward()
    assert model.model.layers[0].mlp.gate_up_proj.weight.grad.abs().sum() > 0


def test_packed_forward_is_differentiable(qwen2_dir):
    model = load_model(qwen2_dir)
    ids = torch.tensor(sum(random_prompts([5, 9]), []))
    model.compute_logits(model.forward_packed(ids, [5, 9])).logsumexp(-1).sum().backward()
    grad = model.model.layers[0].self_attn.qkv_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_tied_embeddings_share_one_tensor(qwen2_dir):
    model = load_model(qwen2_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_close_to_fp32(qwen2_dir, dtype):
    ids = torch.tensor(random_prompts([20])[0])
    with torch.no_grad():
        ref = load_model(qwen2_dir, dtype="float32")
        half = load_model(qwen2_dir, dtype=dtype)
        assert half.model.norm.weight.dtype == dtype
        expected = ref.compute_logits(ref.forward_packed(ids, [20]))
        actual = half.compute_logits(half.forward_packed(ids, [20]))
    # bf16 keeps 8 mantissa bits: logits of magnitude ~5 after 2 layers land within a few 1e-1.
    assert (actual - expected).abs().max() < 0.5
    assert (actual.argmax(-1) == expected.argmax(-1)).float().mean() > 0.8


def test_sliding_window_caps_the_context_length():
    hf = make_hf_model("mistral", sliding_window=64)
    assert ModelConfig.from_hf(hf.config).max_model_len == 64


def test_unsupported_architecture_lists_supported(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama, mistral, qwen2, qwen3"):
        load_model(tmp_path)


def test_unsupported_rope_type_lists_supported():
    hf_config = transformers.LlamaConfig(**{**make_hf_model("llama2").config.to_dict(),
                                            "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'.*default, linear, llama3"):
        ModelConfig.from_hf(hf_config)


def test_linear_rope_scaling_matches_transformers(tmp_path):
    hf = make_hf_model("llama2", rope_scaling={"rope_type": "linear", "factor": 2.0})
    hf.save_pretrained(tmp_path)
    ids = torch.tensor(random_prompts([40])[0])
    model = load_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model.compute_logits(model.forward_packed(ids, [40])),
                                   hf(ids[None]).logits[0], atol=ATOL, rtol=0)


def _copy_with_weights(src, dst, edit):
    dst.mkdir()
    for f in src.iterdir():
        if f.name != SINGLE_FILE:
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, dst / SINGLE_FILE)


def test_missing_tensor_is_named(model_dirs, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    _copy_with_weights(model_dirs["llama"][0], tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        load_model(tmp_path / "m")


def test_misshaped_tensor_is_named(model_dirs, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    _copy_with_weights(model_dirs["llama"][0], tmp_path / "m",
                       lambda t: t.__setitem__(name, t[name][:-1].clone()))
    with pytest.raises(ValueError, match=f"tensor '{name}'.*shape \\(31, 64\\), expected \\(32, 64\\)"):
        load_model(tmp_path / "m")


def test_unexpected_tensor_is_named(model_dirs, tmp_path):
    _copy_with_weights(model_dirs["llama"][0], tmp_path / "m",
                       lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_save_round_trips_through_transformers(model_dirs, tmp_path, arch):
    """The packed q/k/v and gate/up projections are saved under the Hugging Face names, each part from
    its own row block: changed blocks of every part show in transformers' logits."""
    path, hf = model_dirs[arch]
    model = load_model(path)
    with torch.no_grad():  # changes, so the test sees our weights, not the source's
        model.model.norm.weight.add_(1.0)
        for layer in model.model.layers:
            for packed in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj):
                packed.weight.mul_(torch.linspace(0.5, 1.5, packed.weight.shape[0])[:, None])
                if packed.bias is not None:
                    packed.bias.add_(0.1)
    out = tmp_path / "saved"
    save_model(model, out, source_dir=path)
    assert set(load_file(out / SINGLE_FILE)) == set(hf.state_dict()) - (
        {"lm_head.weight"} if model.config.tie_word_embeddings else set())
    reloaded = type(hf).from_pretrained(out).eval()
    ids = torch.tensor(random_prompts([12])[0])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids[None]).logits[0],
                                   model.compute_logits(model.forward_packed(ids, [12])), atol=ATOL, rtol=0)
    assert (out / "tokenizer.json").exists()


def test_save_replaces_atomically_and_leaves_no_temporaries(qwen2_dir, tmp_path):
    model = load_model(qwen2_dir)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("from an older save")
    save_model(model, out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_sharded_save_and_load(qwen2_dir, tmp_path):
    model = load_model(qwen2_dir)
    save_model(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = load_model(tmp_path / "sharded")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    assert torch.equal(hf.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert hf.config.vocab_size == VOCAB


def test_equal_length_packed_batch_matches_one_sequence_at_a_time(qwen2_dir):
    model = load_model(qwen2_dir)
    prompts = random_prompts([11, 11, 11], seed=6)
    with torch.no_grad():
        batched = model.forward_packed(torch.tensor(sum(prompts, [])), [11, 11, 11])  # one SDPA call
        for i, p in enumerate(prompts):
            torch.testing.assert_close(batched[11 * i:11 * (i + 1)],
                                       model.forward_packed(torch.tensor(p), [11]), atol=ATOL, rtol=0)


def test_bf16_save_records_its_dtype_for_transformers(qwen2_dir, tmp_path):
    model = load_model(qwen2_dir, dtype="bfloat16")
    save_model(model, tmp_path / "bf16", source_dir=qwen2_dir)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(tmp_path / "bf16" / SINGLE_FILE)["model.norm.weight"].dtype == torch.bfloat16
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert hf.dtype == torch.bfloat16
    assert torch.equal(hf.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
    assert model.config.hf_config.dtype != "bfloat16"  # saving did not rewrite the loaded config


def test_training_forwards_name_ids_on_another_device_or_of_a_float_dtype(qwen2_dir):
    """forward_packed and the exact mode's packed_hidden say what they expected in one line instead
    of failing inside the embedding lookup (the meta device stands in for CPU ids and a CUDA model)."""
    from fusedrl.engine.model.invariant import BatchInvariant
    model = load_model(qwen2_dir)
    for ids, found in ((torch.zeros(3, dtype=torch.long, device="meta"), "torch.int64 on meta"),
                       (torch.zeros(3), "torch.float32 on cpu")):
        expected = f"input_ids is {found}: expected int64 or int32 ids on the model's device cpu"
        with pytest.raises(ValueError, match=expected):
            model.forward_packed(ids, [3])
        with pytest.raises(ValueError, match=expected):
            BatchInvariant(4).packed_hidden(model, ids, [3])


@needs_triton
def test_decode_set_falls_back_to_the_composition_where_the_fused_kernel_cannot_serve():
    """DECODE.norm_linear runs one kernel only without autograd and with nothing hooked on the
    projection (LoRA's adapters read the normalized input, which the kernel never writes)."""
    from fusedrl.engine.model.causal_lm import Projection, RMSNorm
    from fusedrl.engine.model.primitives import DECODE, FORWARD
    torch.manual_seed(0)
    norm, proj = RMSNorm(16, 1e-6).to(DEVICE), Projection(16, 8, bias=True).to(DEVICE)
    x, residual = torch.randn(3, 16, device=DEVICE), torch.randn(3, 16, device=DEVICE)
    proj.register_forward_hook(lambda module, args, out: out + 1.0)
    with use_backend("triton"), torch.no_grad():
        hooked, _ = DECODE.norm_linear(x, residual, norm, proj, DECODE)
        composed, _ = FORWARD.norm_linear(x, residual, norm, proj, FORWARD)
    assert torch.equal(hooked, composed)  # the hook's +1 applied: the composition ran
    with use_backend("triton"):
        trained, _ = DECODE.norm_linear(x, residual, norm, proj, DECODE)
    assert trained.requires_grad and torch.equal(trained.detach(), composed)


class FusedOps(TorchDispatchMode):
    """Counts the fusedrl custom ops dispatched, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fusedrl":
            self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@needs_triton
def test_decode_set_fuses_the_norm_and_projection_up_to_16_rows():
    """DECODE.norm_linear is the fused kernel (one op) at 1 and 16 rows and the norm, GEMM and
    SiLU * up beyond (17 rows: no fused op), each equal to the composition's within fp32
    rounding."""
    from fusedrl.engine.model.causal_lm import Projection, RMSNorm
    from fusedrl.engine.model.primitives import DECODE, FORWARD, FUSED_NORM_LINEAR_ROWS
    torch.manual_seed(0)
    norm, proj = RMSNorm(16, 1e-6).to(DEVICE), Projection(16, 8, bias=False).to(DEVICE)
    for rows in (1, FUSED_NORM_LINEAR_ROWS, FUSED_NORM_LINEAR_ROWS + 1):
        x, residual = torch.randn(rows, 16, device=DEVICE), torch.randn(rows, 16, device=DEVICE)
        with use_backend("triton"), torch.no_grad(), FusedOps() as ops:
            decoded, _ = DECODE.norm_linear(x, residual, norm, proj, DECODE, glu=True)
            composed, _ = FORWARD.norm_linear(x, residual, norm, proj, FORWARD, glu=True)
        fused = ops.names.count("fusedrl::norm_linear")
        assert fused == (1 if rows <= FUSED_NORM_LINEAR_ROWS else 0), rows
        torch.testing.assert_close(decoded, composed, rtol=1e-5, atol=1e-5)


@needs_triton
def test_a_forward_and_its_recompute_run_on_one_model_backend(monkeypatch):
    """The walk asks the decider once: "auto" keeps a CPU forward and the backward's recompute of
    its checkpointed layers on torch (not one fusedrl op; under TRITON_INTERPRET=1 too), a CUDA one
    on the fused ops; asked for by name, the fused ops run, and the recompute, which runs after the
    `with` block, takes them again."""
    monkeypatch.delenv("FUSEDRL_BACKEND", raising=False)
    hf = make_hf_model("llama", num_hidden_layers=2)
    model = CausalLM(ModelConfig.from_hf(hf.config)).to(DEVICE)
    model.gradient_checkpointing = True
    ids = torch.randint(10, 300, (7,), device=DEVICE)
    with FusedOps() as ops:
        model.forward_packed(ids, [3, 4]).square().mean().backward()
    assert ops.names.count("fusedrl::rope") == (4 if ON_GPU else 0)
    with FusedOps() as ops:
        with use_backend("triton"):
            hidden = model.forward_packed(ids, [3, 4])
        forward_ropes = ops.names.count("fusedrl::rope")
        hidden.square().mean().backward()
    assert forward_ropes == 2 and ops.names.count("fusedrl::rope") == 4  # 2 layers, each recomputed once
