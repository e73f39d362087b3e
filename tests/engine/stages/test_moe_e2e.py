"""The MoE bar on the CPU, per architecture: `fusedrl generate` greedy is transformers' greedy;
`fusedrl sft` trains the model and its export reloads in transformers with our logits. On the CPU
the ops run on torch's kernels, as they do for a user without the Triton interpreter: the MoE
wiring is under test here, the fused kernels in tests/kernels."""
import contextlib
import json

import pytest
import torch
import transformers
import yaml

from fusedrl import kernels
from fusedrl.engine.cli import main
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.train.runlog import read_metrics
from engine_testing import make_tokenizer, random_prompts
from moe_testing import MOE_ARCHS, make_moe_model, save_moe_base
from train_testing import demonstrations, write_jsonl


@pytest.fixture(autouse=True)
def cpu_kernels(device):
    with kernels.use_backend("torch") if device.type == "cpu" else contextlib.nullcontext():
        yield


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_generate_is_transformers_greedy_and_sft_exports_for_transformers(arch, tmp_path, capsys,
                                                                          device):
    base = tmp_path / "base"
    hf = make_moe_model(arch)
    hf.save_pretrained(base)
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(base)

    prompts = ["hello world", "the lazy dog jumps"]
    argv = ["generate", "--model", str(base), "--temperature", "0", "--max-new-tokens", "16",
            "--json",
            "--device", device.type, "--dtype", "float32"]
    assert main(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for prompt, row in zip(prompts, rows, strict=True):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        expected = hf.to(device).generate(torch.tensor([ids], device=device), max_new_tokens=16,
                                          do_sample=False,
                                          pad_token_id=0)
        assert row["token_ids"] == expected[0, len(ids):].tolist()

    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"model": str(base), "output_dir": str(tmp_path / "run"), "data": {
        "train_file": str(write_jsonl(tmp_path / "train.jsonl", demonstrations(16))), "max_length": 48,
        "max_prompt_length": 24, "tokens_per_batch": 96}}))
    assert main(["sft", "--config", str(config), "optim.lr=3e-3", "train.max_steps=6", "train.progress=false",
                 "moe.router_aux_loss_coef=0.01", "moe.router_z_loss_coef=0.001"]) == 0
    train = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert train[-1]["loss"] < 0.7 * train[0]["loss"]
    assert 0 < train[0]["router_aux_loss"] < 8  # top_k = 2 at an even load, at most E * top_k
    final = tmp_path / "run" / "final"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours = load_model(final, dtype="float32")
    ids = torch.tensor(random_prompts([20], seed=9)[0])
    with torch.no_grad():
        torch.testing.assert_close(ours.compute_logits(ours.forward_packed(ids, [20])), reloaded(ids[None]).logits[0],
                                   atol=1e-4, rtol=0)
    trained = load_model(final).model.layers[1].mlp.experts.down_proj
    assert not torch.equal(trained, load_model(base).model.layers[1].mlp.experts.down_proj)


def test_lora_on_moe_trains_attention_adapters_that_peft_loads(tmp_path, capsys):
    """Adapters on the attention projections of a Qwen3-MoE; the MLP targets are refused (PEFT
    maps them to the experts, which get no adapters here)."""
    peft = pytest.importorskip("peft")
    base = save_moe_base(tmp_path / "base", "qwen3_moe")
    run = tmp_path / "run"
    argv = ["sft", f"model={base}", f"output_dir={run}",
            f"data.train_file={write_jsonl(tmp_path / 'train.jsonl', demonstrations(16))}", "data.max_length=48",
            "data.max_prompt_length=24", "data.tokens_per_batch=96", "data.eval_fraction=0", "optim.lr=1e-2",
            "train.max_steps=4", "train.progress=false", "lora.rank=4",
            "train.precision=fp32"]  # a GPU's default, bf16, would round every exported weight
    assert main(argv) != 0
    assert "lora.target_modules has gate_proj,up_proj,down_proj: on a mixture-of-experts model" in capsys.readouterr().err
    assert main(argv + ["train.overwrite=true", "lora.target_modules=q_proj,k_proj,v_proj,o_proj"]) == 0
    before, after = load_model(base).state_dict(), load_model(run / "final").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("self_attn" in k for k in changed)
    tuned = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(run / "final_adapter"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32)
    ids = torch.tensor(random_prompts([12], seed=3)[0])[None]
    with torch.no_grad():
        torch.testing.assert_close(tuned.eval()(ids).logits, merged.eval()(ids).logits, atol=1e-5, rtol=0)
