"""Reward model: the accuracy bar on a synthetic preference set, normalization, export formats,
K-way + beta_rm training, and `fusedrl rm` end to end."""
import json
import math

import pytest
import torch
import transformers

from fusedrl.engine.data.packing import pack
from fusedrl.engine.cli import main
from fusedrl.engine.model.reward_model import load_reward_model, reward_model_from_lm
from fusedrl.engine.stages.rm import mean_raw_reward, train_rm
from fusedrl.engine.train.runlog import read_metrics
from fusedrl.engine.model.hf_io import load_model
from engine_testing import random_prompts
from train_testing import copy_checkpoint, rm_config, save_tiny_model, sorted_digit_preferences, write_jsonl


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    # One layer is enough to compare a sequence's digits; it keeps the bar test to a few seconds.
    return save_tiny_model(tmp_path_factory.mktemp("rm_base"), "llama2", num_hidden_layers=1)


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """A reward model trained on sorted-vs-unsorted digit pairs (120 of 600 held out, 3 epochs)."""
    root = tmp_path_factory.mktemp("rm_run")
    train_file = write_jsonl(root / "train.jsonl", sorted_digit_preferences(600))
    reference = write_jsonl(root / "reference.jsonl", [{"prompt": r["prompt"], "response": r["chosen"]}
                                                       for r in sorted_digit_preferences(20, seed=9)])
    cfg = rm_config(base_dir, train_file, root / "run", reference_file=str(reference),
                    data={"eval_fraction": 0.2}, optim={"lr": 3e-3, "warmup_steps": 5}, train={"epochs": 3})
    return cfg, train_rm(cfg)


def test_rm_beats_90_percent_held_out_pairwise_accuracy(trained):
    cfg, _ = trained
    rows = read_metrics(cfg.output_dir)
    final_eval = [r for r in rows if r["kind"] == "eval"][-1]
    assert final_eval["pairs"] == 120 and final_eval["accuracy"] > 0.9
    # The zero-initialized head scores everything 0, so training starts at exactly log 2 per pair.
    assert [r for r in rows if r["kind"] == "train"][0]["rank_loss"] == pytest.approx(math.log(2))
    assert final_eval["rank_loss"] < 0.5 * math.log(2)


def test_reference_responses_score_mean_zero_after_normalization(trained, device):
    # Scored as the run scored them (its device and dtype, its packing): the offset is that forward's
    # mean, so the mean vanishes to fp32 rounding. Another device's bf16 kernels differ by ~1e-3 of the
    # scores' scale, which is bf16's resolution, not a normalization error.
    cfg, final = trained
    rm = load_reward_model(final, device=device)
    assert rm.reward_offset == json.loads((final / "config.json").read_text())["reward_offset"] != 0
    logged = [r for r in read_metrics(cfg.output_dir) if "reward_offset" in r]
    assert logged[-1]["reward_offset"] == rm.reward_offset and logged[-1]["reference_responses"] == 20
    from transformers import AutoTokenizer
    from fusedrl.engine.stages.rm import reference_sequences
    seqs = reference_sequences(cfg, AutoTokenizer.from_pretrained(final), [])
    scores = torch.cat([rm.rewards(torch.tensor(sum([seqs[i] for i in g], []), device=device),
                                   [len(seqs[i]) for i in g])
                        for g in pack([len(s) for s in seqs], cfg.data.tokens_per_batch)])
    assert len(seqs) == 20 and abs(scores.mean().item()) < 1e-4 and scores.std() > 0


def test_export_loads_in_transformers_as_a_sequence_classifier(trained, train_dtype):
    _, final = trained
    # The export holds the run's parameters in their training dtype (bf16 under bf16-mixed), the
    # score head in fp32; both sides upcast them to fp32 here, so they compute the same numbers.
    assert load_reward_model(final).model.embed_tokens.weight.dtype == train_dtype
    saved = json.loads((final / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == str(train_dtype).removeprefix("torch.")
    ours = load_reward_model(final, dtype="float32")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
    lm = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    prompts = random_prompts([9, 14], seed=4)
    with torch.no_grad():
        expected = torch.stack([hf(torch.tensor([p])).logits[0, 0] for p in prompts]) - ours.reward_offset
        got = ours.rewards(torch.tensor(sum(prompts, [])), [9, 14])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        ids = torch.tensor(prompts[0])
        torch.testing.assert_close(ours.compute_logits(ours.forward_packed(ids, [9])), lm(ids[None]).logits[0],
                                   atol=1e-5, rtol=0)


def test_new_head_starts_at_zero_and_keeps_the_lm(base_dir):
    lm = load_model(base_dir)
    rm = reward_model_from_lm(lm)
    ids = torch.tensor(random_prompts([6])[0])
    assert torch.equal(rm.rewards(ids, [6]), torch.zeros(1))
    assert torch.equal(rm.lm_head.weight, lm.lm_head.weight) and rm.lm_head.weight.data_ptr() != lm.lm_head.weight.data_ptr()
    assert mean_raw_reward(rm, [ids.tolist()], 64, torch.device("cpu")) == 0.0


def test_fusedrl_rm_on_k_way_rankings_with_beta_rm(base_dir, tmp_path):
    rows = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], " 0 0 0 0 0 0 0 0 0"]}
            for r in sorted_digit_preferences(24, seed=2)]
    train_file = write_jsonl(tmp_path / "kway.jsonl", rows)
    assert main(["rm", f"model={base_dir}", f"output_dir={tmp_path / 'run'}", f"data.train_file={train_file}",
                 "data.max_length=48", "data.max_prompt_length=24", "data.tokens_per_batch=256",
                 "data.format=ranking", "data.eval_fraction=0.25", "beta_rm=0.5", "optim.lr=2e-3",
                 "train.max_steps=6", "train.progress=false", "train.tensorboard=true"]) == 0
    metrics = read_metrics(tmp_path / "run")
    train = [r for r in metrics if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] and train[-1]["lm_nll"] < train[0]["lm_nll"]
    assert train[0]["loss"] == pytest.approx(train[0]["rank_loss"] + 0.5 * train[0]["lm_nll"])
    evals = [r for r in metrics if r["kind"] == "eval"]
    assert evals[-1]["pairs"] == 6 * 3  # 6 held-out rankings, C(3, 2) pairs each
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_rm_resume_restores_the_head_and_the_run(base_dir, tmp_path):
    train_file = write_jsonl(tmp_path / "pairs.jsonl", sorted_digit_preferences(40, seed=5))
    kw = dict(data={"eval_fraction": 0.0, "tokens_per_batch": 128}, optim={"warmup_steps": 1})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_rm(rm_config(base_dir, train_file, straight, train={"max_steps": 2, "save_every": 1, "keep_checkpoints": 0}, **kw))
    copy_checkpoint(straight, 1, resumed)
    train_rm(rm_config(base_dir, train_file, resumed, train={"max_steps": 2}, **kw))
    a, b = load_reward_model(straight / "final"), load_reward_model(resumed / "final")
    assert a.score.weight.abs().sum() > 0 and a.reward_offset == b.reward_offset
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
