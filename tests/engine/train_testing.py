"""Helpers for the SFT / reward-model tests: tiny data sets written as JSONL and small configs."""
import json
import random
import shutil
from pathlib import Path

from fusedrl.engine.config.train import DataConfig, OptimConfig, RMConfig, SFTConfig, TrainConfig
from fusedrl.engine.runs.run_dir import MARKER
from fusedrl.engine.train.checkpoint import checkpoint_dir
from engine_testing import make_hf_model, make_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def checkpoint_data(path) -> dict:
    """The plain data of checkpoint `path`: its checkpoint.json (engine/train/checkpoint/__init__.py)."""
    return json.loads((path / "checkpoint.json").read_text())


def save_tiny_model(path, arch="llama2", **overrides):
    """A tiny random model plus the test tokenizer saved at `path`; returns `path`."""
    make_hf_model(arch, **overrides).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def copy_checkpoint(run, step, into):
    """Start the run directory `into` from checkpoint `step` of the run directory `run`, as a user
    moving a run does: the checkpoint and the run's marker (engine/runs/run_dir.py: fusedrl continues only
    a directory it made)."""
    shutil.copytree(checkpoint_dir(run, step), checkpoint_dir(into, step))
    shutil.copy2(Path(run) / MARKER, Path(into) / MARKER)


def demonstrations(n, seed=0):
    """Prompts of words from the tokenizer's corpus, each answered by the same fixed continuation,
    so a few steps of SFT visibly lower the loss."""
    rng = random.Random(seed)
    words = "the quick brown fox jumps over the lazy dog hello world".split()
    return [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))),
             "response": " the lazy dog"} for _ in range(n)]


def sorted_digit_preferences(n, seed=0, length=6):
    """Pairs whose chosen response lists the prompt's digits sorted; the rejected one has the same
    digits, the same first and last, and its middle out of order, so the last token alone cannot
    tell them apart: the reward model has to read the whole response."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        digits = [rng.randrange(10) for _ in range(length)]
        good = sorted(digits)
        middle = good[1:-1]
        if len(set(middle)) < 2:  # no other order of the middle exists
            continue
        while middle == good[1:-1]:
            rng.shuffle(middle)
        bad = [good[0], *middle, good[-1]]
        rows.append({"prompt": "sort " + "".join(map(str, digits)) + ":",
                     "chosen": " " + " ".join(map(str, good)), "rejected": " " + " ".join(map(str, bad))})
    return rows


def sft(model, data, out, *extra, steps=2):
    """The argv of a two-step SFT run of `model` on `data` into `out` that saves every step."""
    return ["sft", f"model={model}", f"output_dir={out}", f"data.train_file={data}", "data.max_length=48",
            "data.max_prompt_length=24", "data.tokens_per_batch=128", "data.eval_fraction=0",
            f"train.max_steps={steps}", "train.save_every=1", "train.progress=false", *extra]


def _stage_config(cls, model_dir, train_file, out_dir, tokens_per_batch, lr, data, optim, train, kw):
    return cls(
        model=str(model_dir), output_dir=str(out_dir), **kw,
        data=DataConfig(**{"train_file": str(train_file), "max_length": 48, "max_prompt_length": 24,
                           "tokens_per_batch": tokens_per_batch, **(data or {})}),
        optim=OptimConfig(**{"lr": lr, **(optim or {})}),
        train=TrainConfig(**{"progress": False, **(train or {})}))


def sft_config(model_dir, train_file, out_dir, *, data=None, optim=None, train=None, **kw):
    return _stage_config(SFTConfig, model_dir, train_file, out_dir, 128, 3e-3, data, optim, train, kw)


def rm_config(model_dir, train_file, out_dir, *, data=None, optim=None, train=None, **kw):
    return _stage_config(RMConfig, model_dir, train_file, out_dir, 512, 2e-3, data, optim, train, kw)
