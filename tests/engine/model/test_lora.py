"""LoRA adapters (engine/model/lora.py, peft_io.py) against PEFT on the transformers model: values,
gradients, files both ways, the disabled switch, merging, and the errors."""
import json

import pytest
import torch

from fusedrl.engine.config.lora import PROJECTIONS, LoRAConfig
from fusedrl.engine.errors import ModelError
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.lora import add_lora
from fusedrl.engine.model.peft_io import CONFIG_FILE, WEIGHTS_FILE, adapter_config, load_adapter, save_adapter
from engine_testing import make_hf_model, random_prompts

peft = pytest.importorskip("peft")  # the test extra; tests/tools/peer_wheels.sh carries it to the GPU image

# fp32 on both sides, the same ops up to matmul blocking: as for the base model (test_model.py).
ATOL = 1e-5
# An odd mix: one attention part of the (packed) q/k/v, v, o and one part of gate/up.
SOME = "q_proj,v_proj,o_proj,up_proj"
LENGTHS = [7, 1, 19]  # a one-token sequence among them


def packed_ids(device="cpu"):
    prompts = random_prompts(LENGTHS, seed=3)
    return torch.tensor(sum(prompts, []), device=device), prompts


def randomize(lora, std=0.05):
    """B = 0 makes every adapter a no-op; give A and B random values so the term is visible."""
    with torch.no_grad():
        for _, a, b in lora.named_targets():
            a.normal_(0, std)
            b.normal_(0, std)


def logits(model, ids):
    return model.compute_logits(model.forward_packed(ids, LENGTHS))


def peft_logits(hf_model, prompts):
    return torch.cat([hf_model(torch.tensor([p])).logits[0] for p in prompts])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fresh_adapters_leave_the_forward_bit_for_bit(model_dirs, arch, dtype):
    model = load_model(model_dirs[arch][0], dtype=dtype)
    ids, _ = packed_ids()
    with torch.no_grad():
        base = logits(model, ids)
        add_lora(model, LoRAConfig(rank=4, alpha=8.0))
        assert torch.equal(logits(model, ids), base)


@pytest.mark.parametrize("targets", [",".join(PROJECTIONS), SOME])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_exported_adapters_give_peft_the_same_logits(model_dirs, tmp_path, arch, targets):
    path, hf = model_dirs[arch]
    model = load_model(path, dtype="float32")
    lora = add_lora(model, LoRAConfig(rank=3, alpha=5.0, target_modules=targets))
    randomize(lora)
    save_adapter(lora, tmp_path / "adapter", base_model=str(path))
    ids, prompts = packed_ids()
    tuned = peft.PeftModel.from_pretrained(make_hf_model(arch), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ours = logits(model, ids)
        theirs = peft_logits(tuned, prompts)
        with lora.disabled():
            assert (ours - logits(model, ids)).abs().max() > 1e-2  # the adapters do something
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_peft_adapters_load_with_the_same_logits(model_dirs, tmp_path):
    path, _ = model_dirs["mistral"]
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=SOME.split(","), lora_dropout=0.1,
                          task_type="CAUSAL_LM", init_lora_weights=False)  # random A and B
    tuned = peft.get_peft_model(make_hf_model("mistral"), cfg).eval()
    tuned.save_pretrained(str(tmp_path))
    model = load_model(path, dtype="float32")
    lora = load_adapter(model, tmp_path)
    assert (lora.config.rank, lora.config.alpha, lora.config.dropout) == (4, 12.0, 0.1)
    model.eval()  # dropout off on both sides
    ids, prompts = packed_ids()
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), peft_logits(tuned, prompts), atol=ATOL, rtol=0)


def test_gradients_reach_only_the_adapters_and_match_peft_in_float64(model_dirs):
    path, _ = model_dirs["qwen2"]
    model = load_model(path, dtype="float32")
    lora = add_lora(model, LoRAConfig(rank=2, alpha=4.0, target_modules=SOME))
    randomize(lora)
    ids, prompts = packed_ids()
    weights = torch.randn(sum(LENGTHS), model.config.vocab_size)  # a random linear loss of the logits
    (logits(model, ids) * weights).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    reference = peft.get_peft_model(make_hf_model("qwen2").double(), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=SOME.split(","), task_type="CAUSAL_LM"))
    by_name = dict(reference.named_parameters())
    with torch.no_grad():
        for target, a, b in lora.named_targets():
            by_name[f"base_model.model.{target}.lora_A.default.weight"].copy_(a)
            by_name[f"base_model.model.{target}.lora_B.default.weight"].copy_(b)
    (peft_logits(reference, prompts) * weights.double()).sum().backward()
    for target, a, b in lora.named_targets():
        for ours, part in ((a, "A"), (b, "B")):
            expected = by_name[f"base_model.model.{target}.lora_{part}.default.weight"].grad
            scale = expected.abs().max()
            torch.testing.assert_close(ours.grad.double() / scale, expected / scale, atol=1e-5, rtol=0)


def test_disabled_adapters_give_the_base_model_and_switch_back(model_dirs):
    model = load_model(model_dirs["llama"][0], dtype="float32")
    ids, _ = packed_ids()
    with torch.no_grad():
        base = logits(model, ids)
        lora = add_lora(model, LoRAConfig(rank=4))
        randomize(lora)
        tuned = logits(model, ids)
        with lora.disabled():
            assert torch.equal(logits(model, ids), base)
        assert torch.equal(logits(model, ids), tuned)


def test_merged_model_equals_the_adapted_one(model_dirs):
    model = load_model(model_dirs["qwen3"][0], dtype="float32")
    lora = add_lora(model, LoRAConfig(rank=4, alpha=8.0, target_modules=SOME))
    randomize(lora)
    ids, _ = packed_ids()
    with torch.no_grad():
        tuned = logits(model, ids)
        lora.merge_()
        assert not any(m._forward_hooks for m in model.modules())
        torch.testing.assert_close(logits(model, ids), tuned, atol=ATOL, rtol=0)


def test_dropout_applies_in_training_mode_only(model_dirs):
    model = load_model(model_dirs["llama"][0], dtype="float32")
    lora = add_lora(model, LoRAConfig(rank=4, dropout=0.5))
    randomize(lora)
    ids, _ = packed_ids()
    with torch.no_grad():
        model.eval()
        first, second = logits(model, ids), logits(model, ids)
        assert torch.equal(first, second)
        model.train()
        assert not torch.equal(logits(model, ids), first)


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({"target_modules": "all-linear"}, "expected a list"),
    ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
])
def test_unsupported_adapter_configs_are_one_line_errors(model_dirs, tmp_path, change, message):
    model = load_model(model_dirs["llama"][0], dtype="float32")
    save_adapter(add_lora(model, LoRAConfig(rank=2)), tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelError, match=message):
        adapter_config(tmp_path)


def test_adapter_files_that_do_not_fit_the_model_are_errors(model_dirs, tmp_path):
    llama = load_model(model_dirs["llama"][0], dtype="float32")
    save_adapter(add_lora(llama, LoRAConfig(rank=2, target_modules="q_proj")), tmp_path)
    qwen3 = load_model(model_dirs["qwen3"][0], dtype="float32")  # head_dim 24: q_proj's B is larger
    with pytest.raises(ModelError, match="has shape"):
        load_adapter(qwen3, tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load_adapter(load_model(model_dirs["llama"][0], dtype="float32"), tmp_path)


@pytest.mark.parametrize("options, message", [
    (dict(rank=-1), "lora.rank must be >= 0, got -1"),
    (dict(rank=4, alpha=0.0), "lora.alpha must be > 0"),
    (dict(rank=4, dropout=1.0), "lora.dropout must be in"),
    (dict(rank=4, target_modules="q_proj,qkv"), r"\['qkv'\] not among"),
    (dict(rank=4, target_modules="q_proj,q_proj"), "twice"),
])
def test_config_errors_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**options)


def test_adapter_gemms_run_through_the_batch_invariant_linear(model_dirs, monkeypatch):
    """In the batch-invariant mode (rollout.exact) the adapters' GEMMs are the mode's fixed-tile
    linear too, so a sequence's hidden states do not depend on what else is in the pack."""
    from types import SimpleNamespace
    from fusedrl.engine.model.invariant import BatchInvariant, mode
    model = load_model(model_dirs["llama"][0], dtype="float32")
    lora = add_lora(model, LoRAConfig(rank=2, target_modules="k_proj,up_proj,down_proj"))
    randomize(lora)
    real, weights = mode.EXACT, []

    def linear(x, weight, *args, **kwargs):
        weights.append(weight)
        return real.linear(x, weight, *args, **kwargs)
    monkeypatch.setattr(mode, "EXACT", SimpleNamespace(**{**vars(real), "linear": linear}))
    ids, _ = packed_ids()
    invariant = BatchInvariant(chunk_size=4)
    with torch.no_grad():
        packed = invariant.packed_hidden(model, ids, LENGTHS)
        alone = invariant.packed_hidden(model, ids[LENGTHS[0]:LENGTHS[0] + LENGTHS[1]], LENGTHS[1:2])
    adapter_weights = {id(p) for p in lora.parameters()}
    per_forward = sum(id(w) in adapter_weights for w in weights) // 2  # two forwards
    assert per_forward == 2 * 3 * len(model.model.layers)  # A and B of 3 targets in every layer
    assert torch.equal(alone, packed[LENGTHS[0]:LENGTHS[0] + LENGTHS[1]])


@pytest.mark.parametrize("change, message", [
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] is not supported for task_type CAUSAL_LM"),
    ({"task_type": "SEQ_CLS", "modules_to_save": ["score", "pooler"]}, "is not supported for task_type SEQ_CLS"),
    ({"task_type": "TOKEN_CLS"}, "task_type='TOKEN_CLS' is not supported"),
])
def test_heads_this_engine_does_not_train_are_one_line_errors(model_dirs, tmp_path, change, message):
    model = load_model(model_dirs["llama"][0], dtype="float32")
    save_adapter(add_lora(model, LoRAConfig(rank=2)), tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelError, match=message):
        load_adapter(load_model(model_dirs["llama"][0], dtype="float32"), tmp_path)
