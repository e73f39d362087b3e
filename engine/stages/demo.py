"""`fusedrl demo`: the whole InstructGPT recipe on a task a program can check, with no downloads.

Task: sort digits. The prompt "sort 4 1 3 1 :" is answered correctly by "1 1 3 4". Everything is
built here: a word-level Hugging Face tokenizer, a tiny random Llama, the data. Then
  1. SFT on noisy demonstrations (a fraction are wrong), so the SFT policy samples wrong answers too;
  2. a reward model on preference pairs (the correct answer over a corrupted one);
  3. PPO of the SFT policy against that reward model, with a frozen reference and a critic
     initialized from the reward model.
Accuracy is judged by the program (is the response the sorted prompt?), never by the reward model,
on held-out prompts, sampling at the rollout temperature.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch

from ..config.demo import DemoConfig
from ..errors import UsageError
from ..train.run_setup import check_output_dir

DIGITS = [str(d) for d in range(10)]
SPECIAL = ["<pad>", "<s>", "</s>"]
VOCAB = SPECIAL + ["sort", ":"] + DIGITS


# --- the task ----------------------------------------------------------------------------------

def prompt_text(digits: list[int]) -> str:
    return "sort " + " ".join(map(str, digits)) + " :"


def answer_text(digits: list[int]) -> str:
    return " ".join(map(str, digits))


def is_correct(prompt: str, response: str) -> bool:
    """The program's judgement: the response lists the prompt's digits in ascending order."""
    digits = [int(t) for t in prompt.split() if t.isdigit()]
    return response.split() == [str(d) for d in sorted(digits)]


# "add" matters: without it PPO found that a repeated last digit ("1 4 8 9 9") scored well with
# the reward model, and accuracy fell from 85% to 46% over 100 iterations (seed 0).
CORRUPTIONS = ("swap", "change", "drop", "add")


def corrupt(digits: list[int], rng: random.Random, kind: str | None = None) -> list[int]:
    """A wrong answer: the sorted digits with two unequal neighbours swapped ("swap"), one digit
    changed ("change"), one dropped ("drop") or one inserted ("add"); a random kind when none is given."""
    good = sorted(digits)
    kind = kind or rng.choice(CORRUPTIONS)
    while True:
        bad = good[:]
        if kind == "swap":
            i = rng.randrange(len(bad) - 1)
            bad[i], bad[i + 1] = bad[i + 1], bad[i]
        elif kind == "change":
            bad[rng.randrange(len(bad))] = rng.randrange(10)
        elif kind == "drop":
            del bad[rng.randrange(len(bad))]
        else:
            bad.insert(rng.randrange(len(bad) + 1), rng.randrange(10))
        if bad != good:
            return bad
        if kind == "swap" and len(set(good)) == 1:  # nothing to swap: fall back to a change
            kind = "change"


def make_prompts(n: int, digits: int, rng: random.Random, exclude: set = frozenset()) -> list[list[int]]:
    out, seen = [], set(exclude)
    while len(out) < n:
        p = tuple(rng.randrange(10) for _ in range(digits))
        if p not in seen:
            seen.add(p)
            out.append(list(p))
    return out


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_data(cfg: DemoConfig, data_dir: Path) -> dict:
    """Demonstrations (noisy), preference pairs, PPO prompts and held-out prompts as JSONL files."""
    rng = random.Random(cfg.seed)
    train = make_prompts(cfg.train_prompts, cfg.digits, rng)
    held_out = make_prompts(cfg.eval_prompts, cfg.digits, rng, exclude={tuple(p) for p in train})
    data_dir.mkdir(parents=True, exist_ok=True)
    demos = [{"prompt": prompt_text(p), "response": " " + answer_text(
        corrupt(p, rng) if rng.random() < cfg.demo_noise else sorted(p))} for p in train]
    # One pair per kind of mistake and prompt, so the reward model learns to catch each of them.
    pairs = [{"prompt": prompt_text(p), "chosen": " " + answer_text(sorted(p)),
              "rejected": " " + answer_text(corrupt(p, rng, kind))} for p in train for kind in CORRUPTIONS]
    return {
        "sft": write_jsonl(data_dir / "demonstrations.jsonl", demos),
        "rm": write_jsonl(data_dir / "preferences.jsonl", pairs),
        "prompts": write_jsonl(data_dir / "prompts.jsonl", [{"prompt": prompt_text(p)} for p in train]),
        "held_out": [prompt_text(p) for p in held_out],
    }


# --- the model ---------------------------------------------------------------------------------

def build_tokenizer():
    """A word-level tokenizer over the task's words: a real `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_base_model(out_dir: Path, seed: int) -> str:
    """A tiny random Llama and its tokenizer, saved as a Hugging Face directory."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=96, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(out_dir)
    build_tokenizer().save_pretrained(out_dir)
    return str(out_dir)


# --- evaluation --------------------------------------------------------------------------------

def sampled_accuracy(model, tokenizer, prompts: list[str], samples: int, temperature: float, seed: int) -> float:
    """Fraction of sampled responses (n per prompt) that the program judges correct."""
    from ..inference.llm import LLM
    from ..inference.sampling_params import SamplingParams

    llm = LLM(model, tokenizer=tokenizer, kv_cache_memory=1 << 24, max_num_seqs=len(prompts) * samples,
              use_cuda_graphs=False)
    outs = llm.generate(prompts, SamplingParams(n=samples, temperature=temperature, max_new_tokens=12, seed=seed))
    judged = [is_correct(p, c.text) for p, out in zip(prompts, outs) for c in out.outputs]
    return sum(judged) / len(judged)


def last_metric(run_dir: str, kind: str, key: str):
    from ..train.runlog import read_metrics

    rows = [r for r in read_metrics(run_dir) if r["kind"] == kind and key in r]
    return rows[-1][key] if rows else None


# --- the recipe --------------------------------------------------------------------------------

def run_demo(cfg: DemoConfig, quiet: bool = False) -> dict:
    """SFT -> RM -> PPO on the sorting task; returns (and saves) the final table."""
    from ..model.hf_io import load_model
    from ..train.plot import plot_run
    from .ppo.trainer import run_ppo
    from ..config.ppo import LoopConfig, UpdateConfig, PPOConfig, RewardConfig, RolloutConfig
    from .rm import run_rm
    from .sft import run_sft
    from ..config.train import DataConfig, OptimConfig, RMConfig, SFTConfig, TrainConfig

    start = time.perf_counter()
    out = Path(cfg.output_dir)
    check_output_dir(out)
    if any(out.iterdir()):
        if not cfg.overwrite:
            raise UsageError(f"output_dir={out} exists and is not empty; pass overwrite=true or another output_dir")
        shutil.rmtree(out)
    data = write_data(cfg, out / "data")
    tokenizer = build_tokenizer()
    base = build_base_model(out / "base", cfg.seed)
    loop = dict(device="cpu" if not torch.cuda.is_available() else None, progress=not quiet, resume=False)
    small = dict(max_length=16, max_prompt_length=8, eval_fraction=0.05)

    sft_dir = run_sft(SFTConfig(
        model=base, output_dir=str(out / "sft"), seed=cfg.seed,
        data=DataConfig(train_file=data["sft"], tokens_per_batch=256, **small),
        optim=OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.0),
        train=TrainConfig(epochs=cfg.sft_epochs, eval_every=0, **loop)))
    rm_dir = run_rm(RMConfig(
        model=str(sft_dir), output_dir=str(out / "rm"), seed=cfg.seed,
        data=DataConfig(train_file=data["rm"], tokens_per_batch=512, **small),
        optim=OptimConfig(lr=1e-3, warmup_steps=10), train=TrainConfig(epochs=cfg.rm_epochs, **loop)))

    temperature = 1.0

    def accuracy(model) -> float:
        return sampled_accuracy(model, tokenizer, data["held_out"], cfg.eval_samples, temperature, cfg.seed)

    sft_model = load_model(sft_dir)
    sft_accuracy = accuracy(sft_model)
    del sft_model
    ppo_dir = run_ppo(PPOConfig(
        policy=str(sft_dir), reward_model=str(rm_dir), prompts_file=data["prompts"],
        output_dir=str(out / "ppo"), seed=cfg.seed,
        rollout=RolloutConfig(prompts_per_iteration=cfg.ppo_prompts, samples_per_prompt=4, max_new_tokens=12,
                              temperature=temperature, kv_cache_memory=1 << 24),
        ppo=UpdateConfig(epochs=2, minibatch_size=32, vf_coef=0.1, gamma=1.0, lam=0.95),
        # Running score normalization with clipping (PPO-max) and a constant learning rate: on this
        # task a decaying rate stalled PPO, and larger steps exploited the reward model.
        reward=RewardConfig(kl_coef=0.1, normalize=True, clip=5.0),
        optim=OptimConfig(lr=2e-4, max_grad_norm=1.0, min_lr_ratio=1.0),
        train=LoopConfig(iterations=cfg.ppo_iterations, log_every=10, **loop)),
        evaluate=lambda models: {"accuracy": accuracy(models.policy)})
    ppo_accuracy = accuracy(load_model(ppo_dir))
    table = {
        "sft_accuracy": sft_accuracy,
        "rm_heldout_accuracy": last_metric(str(out / "rm"), "eval", "accuracy"),
        "ppo_accuracy": ppo_accuracy,
        "ppo_gain_points": 100 * (ppo_accuracy - sft_accuracy),
        "ppo_mean_score": last_metric(str(out / "ppo"), "train", "score_mean"),
        "ppo_kl": last_metric(str(out / "ppo"), "train", "kl"),
        "seconds": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps(table, indent=2), encoding="utf-8")
    plots = [str(p) for run in ("sft", "rm", "ppo") for p in plot_run(out / run)]
    table["plots"] = plots
    return table


def format_table(table: dict) -> str:
    rows = [("SFT accuracy (held-out, sampled)", f"{100 * table['sft_accuracy']:.1f}%"),
            ("RM held-out pairwise accuracy", "-" if table["rm_heldout_accuracy"] is None
             else f"{100 * table['rm_heldout_accuracy']:.1f}%"),
            ("PPO accuracy (held-out, sampled)", f"{100 * table['ppo_accuracy']:.1f}%"),
            ("PPO gain over SFT", f"{table['ppo_gain_points']:+.1f} points"),
            ("PPO mean reward-model score", f"{table['ppo_mean_score']:.3f}"),
            ("PPO KL to the SFT policy", f"{table['ppo_kl']:.3f}"),
            ("wall time", f"{table['seconds']:.0f} s")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
