"""LoRA at train.tensor_parallel=2 under torchrun (gloo CPU ranks, engine/model/lora.py): each B of a
column-parallel projection (q/k/v, gate/up) sliced by rows, each A of a row-parallel one (o_proj,
down_proj) by columns, the rest whole, trained through the walk's collectives. SFT on 2 ranks at T=2
equals one process's adapters and merged model, its PEFT export loads in PeftModel, and its
checkpoint resumes in one process (the adapters' checkpoint names PEFT's layout, at any T)."""
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.model.peft_io import WEIGHTS_FILE
from fusedrl.engine.stages.sft import train_sft
from fusedrl.engine.train.runlog import read_metrics
from dist_testing import check, rank_threads, torchrun
from train_testing import copy_checkpoint, demonstrations, save_tiny_model, sft_config, write_jsonl

# k_proj and gate_proj left out: the adapters' output then has gaps, this rank's share of them zeros.
LORA = LoRAConfig(rank=4, alpha=8.0, target_modules="q_proj,v_proj,o_proj,up_proj,down_proj")
# fp32 and Adam's eps 1e-6, as tests/engine/train/test_tensor_parallel_training.py (why there).
LOOP = {"max_steps": 3, "device": "cpu", "precision": "fp32"}


def max_relative_diff(a: dict, b: dict) -> float:
    """max |a - b| / max |a| over every tensor of two state dicts with the same names."""
    assert a.keys() == b.keys()
    return max(((a[k].float() - b[k].float()).abs().max() / a[k].float().abs().max()).item() for k in a)


def adapters_of(run):
    return load_file(run / "final_adapter" / WEIGHTS_FILE)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_tp")
    base = save_tiny_model(root / "base", arch="llama2")  # 4 key/value heads, untied head
    write_jsonl(root / "train.jsonl", demonstrations(24))

    def config(name, t=1, **loop):
        return sft_config(base, root / "train.jsonl", root / name, lora=LORA, optim={"eps": 1e-6},
                          train={**LOOP, "tensor_parallel": t, **loop})
    check(torchrun("sft", config("t2", 2, save_every=2), root))
    copy_checkpoint(root / "t2", 2, root / "resumed")
    with rank_threads():
        train_sft(config("one"))
        train_sft(config("resumed"))
    return root


def test_two_tensor_ranks_train_one_process_s_adapters(runs):
    one, two = adapters_of(runs / "one"), adapters_of(runs / "t2")
    assert any(name.endswith("o_proj.lora_A.weight") for name in one)
    assert max_relative_diff(one, two) <= 1e-4
    merged_one, merged_two = (load_file(runs / name / "final" / "model.safetensors") for name in ("one", "t2"))
    assert max_relative_diff(merged_one, merged_two) <= 1e-4  # merged into rank-interleaved rows, exported whole
    for key in ("loss", "grad_norm"):
        one_m, two_m = ([r[key] for r in read_metrics(runs / name) if r["kind"] == "train"] for name in ("one", "t2"))
        assert two_m == pytest.approx(one_m, rel=1e-5), key


def test_the_tensor_parallel_export_loads_in_peft(runs):
    tuned = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        runs / "base", dtype=torch.float32), str(runs / "t2" / "final_adapter"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(runs / "t2" / "final", dtype=torch.float32)
    ids = torch.tensor([[5, 9, 2, 17, 11, 3]])
    with torch.no_grad():
        torch.testing.assert_close(tuned.eval()(ids).logits, merged.eval()(ids).logits, atol=1e-5, rtol=0)


def test_a_tensor_parallel_checkpoint_resumes_in_one_process(runs):
    assert max_relative_diff(adapters_of(runs / "one"), adapters_of(runs / "resumed")) <= 1e-4
