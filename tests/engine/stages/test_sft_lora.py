"""SFT with LoRA: only the adapters train, the export is the adapters (loadable by PEFT) and the
merged model (loadable by transformers), with the same logits, and a resumed run is exact."""

import pytest
import torch
import transformers
from safetensors.torch import load_file

from fusedrl.engine.cli import main
from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.peft_io import WEIGHTS_FILE
from fusedrl.engine.stages.sft import train_sft
from fusedrl.engine.train.checkpoint import read_tensors
from fusedrl.engine.train.runlog import read_metrics
from engine_testing import random_prompts
from train_testing import copy_checkpoint, sft_config
from test_sft_trainer import base_dir, train_file  # noqa: F401 (the SFT tests' fixtures)

peft = pytest.importorskip("peft")  # the test extra; tests/tools/peer_wheels.sh carries it to the GPU image


def test_fusedrl_sft_with_lora_trains_adapters_and_exports_them_and_the_merged_model(base_dir, train_file,
                                                                                      tmp_path):
    run = tmp_path / "run"
    assert main(["sft", f"model={base_dir}", f"output_dir={run}", f"data.train_file={train_file}",
                 "data.max_length=48", "data.max_prompt_length=24", "data.tokens_per_batch=96",
                 "data.eval_fraction=0", "optim.lr=1e-2", "train.max_steps=8", "train.progress=false",
                 "train.precision=fp32", "lora.rank=8", "lora.alpha=16",
                 "lora.target_modules=q_proj,v_proj,up_proj,down_proj"]) == 0
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert train[-1]["loss"] < 0.7 * train[0]["loss"]

    base, merged = load_model(base_dir).state_dict(), load_model(run / "final").state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    adapted = ("q_proj.weight", "v_proj.weight", "up_proj.weight", "down_proj.weight")
    assert changed and all(k.endswith(adapted) for k in changed)  # embeddings, norms, k/o/gate: frozen

    tuned = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), str(run / "final_adapter"))
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32)
    ids = torch.tensor(random_prompts([12])[0])[None]
    with torch.no_grad():
        torch.testing.assert_close(tuned.eval()(ids).logits, hf_merged.eval()(ids).logits, atol=1e-5, rtol=0)

    # `fusedrl export --merge` of the adapters (base from adapter_config.json) == the run's own merge.
    assert main(["export", str(run / "final_adapter"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    exported = load_model(tmp_path / "merged").state_dict()
    assert all(torch.equal(exported[k], merged[k]) for k in merged)
    assert (tmp_path / "merged" / "tokenizer.json").exists()


def test_export_usage_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "nothing to export without --merge" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--merge", "--out", str(tmp_path / "out")]) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err


def test_resume_with_adapters_gives_the_same_adapters_as_an_uninterrupted_run(base_dir, train_file, tmp_path):
    kw = dict(optim={"grad_accum_steps": 2, "warmup_steps": 1}, data={"eval_fraction": 0.0},
              lora=LoRAConfig(rank=4, dropout=0.1))  # dropout: the RNG state must resume too
    straight = tmp_path / "straight"
    train_sft(sft_config(base_dir, train_file, straight, train={"max_steps": 3, "save_every": 1, "keep_checkpoints": 0},
                         **kw))
    resumed = tmp_path / "resumed"
    copy_checkpoint(straight, 2, resumed)
    train_sft(sft_config(base_dir, train_file, resumed, train={"max_steps": 3}, **kw))
    a = load_file(straight / "final_adapter" / WEIGHTS_FILE)
    b = load_file(resumed / "final_adapter" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first, last = (read_tensors(straight / "checkpoints" / f"step-0000000{i}", "models.adapter.") for i in (2, 3))
    assert not all(torch.equal(last[k], first[k]) for k in last)  # the third step did change the adapters
