"""The reward model with LoRA: the decoder frozen, the adapters and the fp32 score head train; the
export is a PEFT SEQ_CLS adapter (modules_to_save ["score"]) that PEFT loads onto transformers'
sequence classifier with our rewards, and the merged reward model; `fusedrl export --merge` of the
adapter gives the same; a resumed run is exact."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from fusedrl.engine.cli import main
from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.errors import ModelError
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.peft_io import CONFIG_FILE, WEIGHTS_FILE, load_adapter
from fusedrl.engine.model.reward_model import load_reward_model, reward_model_from_lm
from fusedrl.engine.stages.rm import train_rm
from fusedrl.engine.train.checkpoint import read_tensors
from engine_testing import random_prompts
from train_testing import checkpoint_data, copy_checkpoint, rm_config, sorted_digit_preferences, write_jsonl
from test_rm_trainer import base_dir  # noqa: F401 (the reward-model tests' one-layer base)

peft = pytest.importorskip("peft")  # the test extra; tests/tools/peer_wheels.sh carries it to the GPU image

LENGTHS = [9, 1, 14]  # a one-token sequence among them


def peft_rewards(base_dir, adapter_dir, prompts):
    """Raw scores [S] of transformers' sequence classifier of `base_dir` with PEFT's adapter loaded."""
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
    with torch.no_grad():
        return torch.stack([tuned(torch.tensor([p])).logits[0, 0] for p in prompts])


def our_rewards(model_dir, prompts):
    rm = load_reward_model(model_dir, dtype="float32")
    return rm.rewards(torch.tensor(sum(prompts, [])), [len(p) for p in prompts]), rm.reward_offset


def test_fusedrl_rm_with_lora_exports_a_peft_sequence_classifier_and_the_merged_model(base_dir, tmp_path):
    train_file = write_jsonl(tmp_path / "pairs.jsonl", sorted_digit_preferences(32, seed=1))
    run = tmp_path / "run"
    assert main(["rm", f"model={base_dir}", f"output_dir={run}", f"data.train_file={train_file}",
                 "data.max_length=48", "data.max_prompt_length=24", "data.tokens_per_batch=256",
                 "data.eval_fraction=0", "optim.lr=1e-2", "train.max_steps=3", "train.progress=false",
                 "train.precision=fp32", "lora.rank=4", "lora.alpha=8",
                 "lora.target_modules=q_proj,v_proj,up_proj"]) == 0
    adapter = run / "final_adapter"
    config = json.loads((adapter / CONFIG_FILE).read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    tensors = load_file(adapter / WEIGHTS_FILE)
    assert tensors["base_model.model.score.weight"].dtype == torch.float32
    assert tensors["base_model.model.score.weight"].abs().sum() > 0  # the head trained

    base, merged = load_model(base_dir).state_dict(), load_reward_model(run / "final").state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight", "up_proj.weight")) for k in changed)

    prompts = random_prompts(LENGTHS, seed=4)
    ours, offset = our_rewards(run / "final", prompts)
    assert offset != 0 and json.loads((adapter / "reward_offset.json").read_text())["reward_offset"] == offset
    theirs = peft_rewards(base_dir, adapter, prompts)
    torch.testing.assert_close(ours, theirs - offset, atol=1e-5, rtol=0)
    rm = load_reward_model(run / "final", dtype="float32")
    unadapted = reward_model_from_lm(load_model(base_dir))
    with torch.no_grad():
        unadapted.score.weight.copy_(rm.score.weight)
        base_scores = unadapted.rewards(torch.tensor(sum(prompts, [])), LENGTHS) - offset
    assert (base_scores - ours).abs().max() > 1e-4  # the adapters changed the scores, not the head alone

    # `fusedrl export --merge` of the adapter (base from adapter_config.json) == the run's own merge.
    assert main(["export", str(adapter), "--merge", "--out", str(tmp_path / "merged")]) == 0
    exported = load_reward_model(tmp_path / "merged")
    assert exported.reward_offset == offset
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in merged.items())


def test_peft_sequence_classifier_adapters_load_into_our_reward_model(base_dir, tmp_path):
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.float32)
    cfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "gate_proj", "o_proj"], task_type="SEQ_CLS",
                          modules_to_save=["score"], init_lora_weights=False)  # random A and B
    tuned = peft.get_peft_model(hf, cfg).eval()
    with torch.no_grad():
        tuned.base_model.model.score.modules_to_save["default"].weight.normal_()
    tuned.save_pretrained(str(tmp_path / "adapter"))
    prompts = random_prompts(LENGTHS, seed=5)
    rm = reward_model_from_lm(load_model(base_dir, dtype="float32"))
    lora = load_adapter(rm, tmp_path / "adapter")
    assert list(lora.heads) == ["score"] and rm.score.weight.requires_grad
    with torch.no_grad():
        ours = rm.rewards(torch.tensor(sum(prompts, [])), LENGTHS)
        expected = torch.stack([tuned(torch.tensor([p])).logits[0, 0] for p in prompts])
    # The head is drawn from the global generator: rewards of order 10, fp32 rounding relative to them.
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelError, match="needs a reward model, got a CausalLM without 'score'"):
        load_adapter(load_model(base_dir), tmp_path / "adapter")


def test_rm_lora_resume_gives_the_same_adapters_and_head(base_dir, tmp_path):
    train_file = write_jsonl(tmp_path / "pairs.jsonl", sorted_digit_preferences(40, seed=5))
    kw = dict(data={"eval_fraction": 0.0, "tokens_per_batch": 128}, optim={"warmup_steps": 1},
              lora=LoRAConfig(rank=4, dropout=0.1))  # dropout: the RNG state must resume too
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_rm(rm_config(base_dir, train_file, straight, train={"max_steps": 2, "save_every": 1, "keep_checkpoints": 0},
                       **kw))
    checkpoint = straight / "checkpoints" / "step-00000001"
    assert checkpoint_data(checkpoint)["models"] == ["adapter"]  # the adapters and head, not the model
    copy_checkpoint(straight, 1, resumed)
    train_rm(rm_config(base_dir, train_file, resumed, train={"max_steps": 2}, **kw))
    a, b = (load_file(run / "final_adapter" / WEIGHTS_FILE) for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = read_tensors(checkpoint, "models.adapter.")
    assert not torch.equal(a["base_model.model.score.weight"], first["heads.score.weight"])
    x, y = load_reward_model(straight / "final"), load_reward_model(resumed / "final")
    assert x.reward_offset == y.reward_offset
    assert all(torch.equal(v, y.state_dict()[k]) for k, v in x.state_dict().items())
