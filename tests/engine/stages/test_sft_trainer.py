"""SFT: the loss against materialized logits, training steps, accumulation, checkpointing, resume,
export to transformers, and the `fusedrl sft` command end to end."""
import json
import math
import resource
import signal

import pytest
import torch
import transformers
import yaml

import fusedrl.kernels as kernels

from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.data.packing import collate_sft
from fusedrl.engine.cli import main
from fusedrl.engine.stages.sft import target_nll_sum
from fusedrl.engine.train.optim import build_optimizer, build_scheduler, lr_factor
from fusedrl.engine.train.runlog import read_metrics
from fusedrl.engine.stages.sft import train_sft, sft_loss, sft_stage
from fusedrl.engine.data.tokenization import TokenizedExample
from fusedrl.engine.train.supervised import train_step
from fusedrl.engine.errors import UsageError
from fusedrl.engine.train.checkpoint import (SavedModel, Trainables, latest_checkpoint, read_tensors,
                                             save_checkpoint)
from engine_testing import random_prompts
from train_testing import copy_checkpoint, demonstrations, save_tiny_model, sft_config, write_jsonl


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("sft_base"), "qwen2")  # tied embeddings


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft_data") / "train.jsonl", demonstrations(24))


def examples(seed=0):
    prompts = random_prompts([5, 3, 7, 2], seed=seed)
    return [TokenizedExample(p[:-2], (p[-2:],)) for p in prompts]


def test_sft_loss_is_the_mean_response_nll_of_the_full_logits(base_dir):
    model = load_model(base_dir)
    batch = collate_sft(examples())
    loss, stats = sft_loss(model, batch, {"tokens": batch.num_targets})
    logits = model.compute_logits(model.forward_packed(batch.input_ids, batch.seqlens))  # [N, V]
    rows, targets = batch.target_rows, batch.target_ids
    expected = -torch.log_softmax(logits[rows], -1).gather(1, targets[:, None]).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    # 2 targets per sequence (last prompt token + first response token), 1 for the empty prompt
    assert batch.num_targets == 7 and stats["nll_sum"] == pytest.approx(expected.item() * 7, rel=1e-5)
    got = torch.autograd.grad(loss, model.lm_head.weight)[0]
    torch.testing.assert_close(got, torch.autograd.grad(expected, model.lm_head.weight)[0], atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(base_dir):
    grads = []
    for recompute in (False, True):
        model = load_model(base_dir)
        model.gradient_checkpointing = recompute
        batch = collate_sft(examples())
        sft_loss(model, batch, {"tokens": batch.num_targets})[0].backward()
        grads.append(model.model.layers[0].mlp.gate_up_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)


def test_accumulated_micro_batches_match_one_packed_batch(base_dir, train_file, tmp_path):
    cfg = sft_config(base_dir, train_file, tmp_path, optim={"lr": 1e-2})
    stage, exs, weights = sft_stage("float32", torch.device("cpu")), examples(), []
    for batches in ([collate_sft(exs[:2]), collate_sft(exs[2:])], [collate_sft(exs)]):
        model = load_model(base_dir)
        optimizer = build_optimizer(model, cfg.optim)
        metrics = train_step(model, stage, batches, optimizer, build_scheduler(optimizer, cfg.optim, 10), cfg,
                             torch.device("cpu"))
        weights.append((model.model.layers[1].self_attn.o_proj.weight.detach().clone(), metrics))
    (w_accum, m_accum), (w_one, m_one) = weights
    assert m_accum["loss"] == pytest.approx(m_one["loss"], rel=1e-6)
    assert m_accum["grad_norm"] == pytest.approx(m_one["grad_norm"], rel=1e-5)
    torch.testing.assert_close(w_accum, w_one, atol=1e-6, rtol=0)


def test_warmup_then_cosine_by_hand():
    # warmup 2, 6 steps, floor 0.1: (s+1)/2 during warmup, then 0.1 + 0.45 (1 + cos(pi p)), p = (s-2)/3
    got = [lr_factor(s, 2, 6, 0.1) for s in range(6)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.1 + 0.45 * 1.5, 0.1 + 0.45 * 0.5, 0.1])


def test_interrupted_save_leaves_no_checkpoint(base_dir, tmp_path):
    """A save that fails halfway through writing its shard (a file size limit, as a full disk would)."""
    model = load_model(base_dir)
    optimizer = build_optimizer(model, sft_config(base_dir, "t", tmp_path).optim)
    scheduler = build_scheduler(optimizer, sft_config(base_dir, "t", tmp_path).optim, 4)
    parts = Trainables({"model": SavedModel(model, load_model)}, [optimizer], [scheduler])
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        with pytest.raises(Exception, match="File too large"):
            save_checkpoint(tmp_path, 3, parts, {"step": 3})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert latest_checkpoint(tmp_path) is None and list((tmp_path / "checkpoints").iterdir()) == []


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(base_dir, train_file, tmp_path):
    # Two optimizer steps of 2 micro-batches each over a data set of ~3 micro-batches per epoch, so the
    # second step crosses an epoch boundary: the data position and the Adam moments both matter.
    kw = dict(optim={"grad_accum_steps": 2, "warmup_steps": 1}, data={"eval_fraction": 0.0},
              train={"max_steps": 2})
    straight = tmp_path / "straight"
    train_sft(sft_config(base_dir, train_file, straight, train={**kw["train"], "save_every": 1, "keep_checkpoints": 0},
                         optim=kw["optim"], data=kw["data"]))
    resumed = tmp_path / "resumed"
    copy_checkpoint(straight, 1, resumed)
    train_sft(sft_config(base_dir, train_file, resumed, **kw))
    a, b = load_model(straight / "final").state_dict(), load_model(resumed / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = read_tensors(straight / "checkpoints" / "step-00000001", "models.model.")
    assert not all(torch.equal(a[k], first[k]) for k in a)  # the second step did change the weights
    info = [r for r in read_metrics(resumed) if "resumed_from" in r][0]
    assert info["resumed_from"].endswith("step-00000001")


def test_fusedrl_sft_lowers_the_loss_and_exports_for_transformers(base_dir, train_file, tmp_path, train_dtype):
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"model": str(base_dir), "output_dir": str(tmp_path / "run"),
                                      "data": {"train_file": str(train_file), "max_length": 48,
                                               "max_prompt_length": 24, "tokens_per_batch": 96,
                                               "eval_fraction": 0.2}}))
    assert main(["sft", "--config", str(config), "optim.lr=3e-3", "train.max_steps=8", "train.progress=false",
                 "train.eval_every=4"]) == 0
    rows = read_metrics(tmp_path / "run")
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 9)) and [r["step"] for r in evals] == [4, 8]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"] and evals[-1]["loss"] < evals[0]["loss"]
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["loss"]))
    assert {"lr", "grad_norm", "tokens_per_s", "peak_mem_mb"} <= set(train[0])
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["lr"] == 3e-3

    final = tmp_path / "run" / "final"
    # The export holds the parameters in the run's training dtype (bf16 under bf16-mixed on a GPU),
    # and says so in config.json; compared in fp32 on both sides, the numbers are the same.
    assert load_model(final).lm_head.weight.dtype == train_dtype
    saved = json.loads((final / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == str(train_dtype).removeprefix("torch.")
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours = load_model(final, dtype="float32")
    ids = torch.tensor(random_prompts([12])[0])
    with torch.no_grad():
        torch.testing.assert_close(ours.compute_logits(ours.forward_packed(ids, [12])), hf(ids[None]).logits[0],
                                   atol=1e-5, rtol=0)
    assert (final / "tokenizer.json").exists()
    assert json.loads((final / "config.json").read_text())["tie_word_embeddings"] is True


def test_lm_head_follows_autocast_and_keeps_fp32_master_gradients(base_dir):
    # What bf16 autocast on a GPU does, on the CPU: the head runs in bf16, gradients land in fp32.
    model = load_model(base_dir)
    batch = collate_sft(examples())
    with kernels.use_backend("torch"):
        exact = sft_loss(model, batch, {"tokens": batch.num_targets})[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.forward_packed(batch.input_ids, batch.seqlens)
            nll = target_nll_sum(model, hidden, batch) / batch.num_targets
    nll.backward()
    assert nll.dtype == torch.float32 and model.lm_head.weight.grad.dtype == torch.float32
    assert nll.item() != exact.item() and nll.item() == pytest.approx(exact.item(), rel=2e-2)


def test_max_length_beyond_the_model_is_refused(base_dir, train_file, tmp_path):
    cfg = sft_config(base_dir, train_file, tmp_path, data={"max_length": 200, "max_prompt_length": 24,
                                                            "tokens_per_batch": 400})
    with pytest.raises(UsageError, match="data.max_length=200 exceeds the model's context of 128"):
        train_sft(cfg)
