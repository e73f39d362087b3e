"""The demo's task, data and model, built from nothing: sort digits. The prompt "sort 4 1 3 1 :" is
answered correctly by "1 1 3 4"; a program judges every answer. Everything is made here: a
word-level Hugging Face tokenizer, a tiny random Llama, noisy demonstrations, preference pairs
(one per kind of mistake), prompts. The recipe that trains on them is engine/demos/sorting.py.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..config.demo import DemoConfig

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


# The noisy demonstrations' mistakes.
CORRUPTIONS = ("swap", "change", "drop", "add")
# The preference pairs' rejected answers, one per kind and prompt. "add" matters: without it PPO
# found that a repeated last digit ("1 4 8 9 9") scored well with the reward model, and accuracy
# fell from 85% to 46% over 100 iterations (seed 0). "miscount" (a changed digit, the answer kept in
# order, so only counting the digits catches it) instead of "change" (mostly out of order, caught
# by order alone): with "change" PPO stalled at 72-75% for seed 2, and 162 of its 163 sampled
# mistakes on 200 training prompts were sorted answers repeating the wrong digit
# ("sort 4 0 0 5 :" -> "0 4 4 5").
PAIR_CORRUPTIONS = ("swap", "miscount", "drop", "add")


def corrupt(digits: list[int], rng: random.Random, kind: str | None = None) -> list[int]:
    """A wrong answer: the sorted digits with two unequal neighbours swapped ("swap"), one digit
    changed ("change"; "miscount": and the answer kept sorted), one dropped ("drop") or one inserted
    ("add"); a random kind of CORRUPTIONS when none is given."""
    good = sorted(digits)
    kind = kind or rng.choice(CORRUPTIONS)
    while True:
        bad = good[:]
        if kind == "swap":
            i = rng.randrange(len(bad) - 1)
            bad[i], bad[i + 1] = bad[i + 1], bad[i]
        elif kind in ("change", "miscount"):
            bad[rng.randrange(len(bad))] = rng.randrange(10)
            if kind == "miscount":
                bad.sort()
        elif kind == "drop":
            del bad[rng.randrange(len(bad))]
        else:
            bad.insert(rng.randrange(len(bad) + 1), rng.randrange(10))
        if bad != good:
            return bad
        if kind == "swap" and len(set(good)) == 1:  # nothing to swap: fall back to a change
            kind = "change"


def make_prompts(n: int, digits: int, rng: random.Random,
                 exclude: set = frozenset()) -> list[list[int]]:
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
              "rejected": " " + answer_text(corrupt(p, rng, kind))} for p in train
             for kind in PAIR_CORRUPTIONS]
    return {
        "sft": write_jsonl(data_dir / "demonstrations.jsonl", demos),
        "rm": write_jsonl(data_dir / "preferences.jsonl", pairs),
        "prompts": write_jsonl(data_dir / "prompts.jsonl",
                               [{"prompt": prompt_text(p)} for p in train]),
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
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def build_base_model(out_dir: Path, seed: int, arch: str = "llama", tokenizer=None,
                     max_positions: int = 64, **sizes) -> str:
    """A tiny random Llama (or Qwen3-MoE of the same shapes, 8 experts of half the MLP width, top-2)
    over `tokenizer`'s vocabulary (default: this task's) and the tokenizer, saved as a Hugging Face
    directory; `sizes` (hidden_size, intermediate_size, num_hidden_layers) replace the shapes'."""
    import torch
    import transformers

    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    shapes = dict(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  tie_word_embeddings=True)
    shapes.update(sizes)
    if arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**shapes, head_dim=24, num_experts=8,
                                             num_experts_per_tok=2, moe_intermediate_size=96,
                                             norm_topk_prob=True)
        transformers.Qwen3MoeForCausalLM(config).save_pretrained(out_dir)
    else:
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**shapes)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)
