"""Loading a stage's data: a DataConfig to tokenized train and eval examples (read, tokenize,
split), and PPO's prompt files to token ids."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .records import parser_for, read_jsonl
from .tokenization import TokenizedExample, tokenize_prompt, tokenize_record
from ..config.train import DataConfig


@dataclass
class Examples:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    records: list          # the training records (text), e.g. for the reward offset
    info: dict             # counts for the run log: lines skipped, examples dropped


def tokenize_all(records, tokenizer, cfg: DataConfig) -> tuple[list[TokenizedExample], int]:
    """Tokenized examples and how many records were dropped for having no room for a response."""
    out = [tokenize_record(tokenizer, r, cfg.max_length, cfg.max_prompt_length) for r in records]
    kept = [e for e in out if e is not None]
    return kept, len(out) - len(kept)


def split_off(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded `fraction` of range(n), at least one when > 0."""
    if fraction == 0 or n < 2:
        return list(range(n)), []
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(max(1, round(n * fraction)), n - 1)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def load_examples(cfg: DataConfig, tokenizer, stage: str, seed: int) -> Examples:
    """Read cfg.train_file (and cfg.eval_file, or hold out cfg.eval_fraction) for stage sft|rm."""
    parse = parser_for(stage, cfg.format)
    train = read_jsonl(cfg.train_file, parse, cfg.skip_malformed)
    records = train.records
    info = {"skipped_lines": train.skipped, "skipped_first": train.errors[:5]}
    if cfg.eval_file:
        held = read_jsonl(cfg.eval_file, parse, cfg.skip_malformed)
        eval_records = held.records
        info["skipped_lines"] += held.skipped
        info["skipped_first"] += held.errors[:5]
    else:
        keep, held_out = split_off(len(records), cfg.eval_fraction, seed)
        records, eval_records = [records[i] for i in keep], [records[i] for i in held_out]
    train_ex, dropped = tokenize_all(records, tokenizer, cfg)
    eval_ex, dropped_eval = tokenize_all(eval_records, tokenizer, cfg)
    info.update(train_examples=len(train_ex), eval_examples=len(eval_ex), dropped_examples=dropped + dropped_eval)
    if not train_ex:
        raise ValueError(f"{cfg.train_file}: no training examples left after tokenization")
    return Examples(train_ex, eval_ex, records, info)


def _parse_prompt(row: dict) -> str:
    prompt = row.get("prompt") if isinstance(row, dict) else None
    if not isinstance(prompt, str) or not prompt:
        raise ValueError('expected an object with a non-empty string "prompt"')
    return prompt


def load_prompts(path, tokenizer, max_prompt_length: int) -> list[list[int]]:
    """Token ids of every prompt in a JSONL file of {"prompt": ...} lines."""
    texts = read_jsonl(path, _parse_prompt).records
    if not texts:
        raise ValueError(f"{path}: no prompts")
    return [tokenize_prompt(tokenizer, t, max_prompt_length) for t in texts]
