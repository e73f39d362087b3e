"""Qwen3-MoE and Mixtral against transformers: logits, gradients, both checkpoint layouts, refusals."""
import pytest
import torch
import transformers
from safetensors.torch import save_file

from fusedrl.engine.model.hf_io import load_model, save_model
from fusedrl.engine.model.moe import moe_blocks, routing_trace
from engine_testing import random_prompts, saved_models
from moe_testing import MOE_ARCHS, make_moe_model

ATOL = 1e-5  # fp32, as the dense parity tests


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    """arch -> (directory saved by transformers' save_pretrained, the transformers model)."""
    return saved_models(tmp_path_factory, MOE_ARCHS, make_moe_model)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_logits_and_gradients_match_transformers(moe_dirs, arch):
    path, hf = moe_dirs[arch]
    model = load_model(path, dtype="float32")
    assert len(moe_blocks(model)) == (1 if arch == "qwen3_moe" else 2)
    prompts = random_prompts([23, 9], seed=2)
    ids = torch.tensor(sum(prompts, []))
    with routing_trace(model) as trace:
        ours = model.compute_logits(model.forward_packed(ids, [23, 9]))
    used = torch.cat([t.reshape(-1) for t in trace.chosen.values()]).unique()
    assert len(used) >= 6  # the router spreads the tokens: most experts take some
    hf.zero_grad()
    for p, got in zip(prompts, ours.split([23, 9])):
        expected = hf(torch.tensor([p])).logits[0]
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        expected.logsumexp(-1).sum().backward()
    ours.logsumexp(-1).sum().backward()
    block = moe_blocks(model)[-1]
    hf_block = hf.model.layers[block.layer_idx].mlp
    for mine, theirs in ((block.experts.gate_up_proj, hf_block.experts.gate_up_proj),
                         (block.experts.down_proj, hf_block.experts.down_proj), (block.gate.weight, hf_block.gate.weight),
                         (model.model.layers[0].self_attn.o_proj.weight, hf.model.layers[0].self_attn.o_proj.weight)):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_both_checkpoint_layouts_load_and_save_reloads_in_transformers(moe_dirs, tmp_path, arch):
    path, hf = moe_dirs[arch]
    packed = tmp_path / "packed"  # transformers 5's in-memory names, as some checkpoints are written
    hf.config.save_pretrained(packed)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight" or
               not hf.config.tie_word_embeddings}, str(packed / "model.safetensors"))
    ids = torch.tensor(random_prompts([17], seed=4)[0])
    with torch.no_grad():
        logits = [m.compute_logits(m.forward_packed(ids, [17])) for m in (load_model(path), load_model(packed))]
        torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)
        save_model(load_model(packed), tmp_path / "out", source_dir=path)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(reloaded(ids[None]).logits[0], logits[0], atol=1e-4, rtol=0)


def test_replay_overrides_the_router_where_recorded(moe_dirs):
    model = load_model(moe_dirs["mixtral"][0])
    ids = torch.tensor(random_prompts([12], seed=5)[0])
    with torch.no_grad(), routing_trace(model) as own:
        base = model.forward_packed(ids, [12])
    flipped = {layer: (7 - chosen) for layer, chosen in own.chosen.items()}
    flipped[0][6:] = -1  # tokens 6.. of layer 0 route themselves
    with torch.no_grad(), routing_trace(model, replay=flipped) as replayed:
        out = model.forward_packed(ids, [12])
    assert torch.equal(replayed.chosen[1], 7 - own.chosen[1])
    assert torch.equal(replayed.chosen[0][6:], own.chosen[0][6:]) and torch.equal(replayed.chosen[0][:6], 7 - own.chosen[0][:6])
    assert not torch.allclose(out, base)
    with torch.no_grad(), routing_trace(model, replay=own.chosen):
        torch.testing.assert_close(model.forward_packed(ids, [12]), base, atol=0, rtol=0)


@pytest.mark.parametrize("arch,overrides,message", [
    ("qwen2_moe", {}, "unsupported model_type 'qwen2_moe': its shared experts"),
    ("deepseek_v3", {}, "grouped top-k routing"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1 is not supported"),
])
def test_moe_variants_we_do_not_reproduce_are_refused_in_one_line(tmp_path, arch, overrides, message):
    config = transformers.AutoConfig.for_model(arch, **overrides)
    config.save_pretrained(tmp_path)
    with pytest.raises(Exception, match=message) as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value)


def test_checkpointed_layers_recompute_with_the_replayed_experts(moe_dirs):
    """Backward runs after routing_trace has exited: a recomputed layer must still route by the
    replay (here every token's experts differ from the router's own), or its gradients would be
    another forward's."""
    model = load_model(moe_dirs["mixtral"][0])
    ids = torch.tensor(random_prompts([14], seed=6)[0])
    with torch.no_grad(), routing_trace(model) as own:
        model.forward_packed(ids, [14])
    replay = {layer: 7 - chosen for layer, chosen in own.chosen.items()}
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        with routing_trace(model, replay=replay):
            loss = model.forward_packed(ids, [14]).square().sum()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_bf16_forward_and_backward_stay_close_to_fp32(moe_dirs, arch):
    ids = torch.tensor(random_prompts([30], seed=8)[0])
    half, full = load_model(moe_dirs[arch][0], dtype="bfloat16"), load_model(moe_dirs[arch][0], dtype="float32")
    logits = half.compute_logits(half.forward_packed(ids, [30]))
    logits.logsumexp(-1).sum().backward()
    with torch.no_grad():
        expected = full.compute_logits(full.forward_packed(ids, [30]))
    # bf16 rounds the router's logits too: a token near a tie may take another expert, so the bound
    # is on the argmax, with every gradient finite.
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.8
    assert all(p.grad is None or p.grad.isfinite().all() for p in half.parameters())
    assert moe_blocks(half)[0].experts.gate_up_proj.grad.dtype == torch.bfloat16
