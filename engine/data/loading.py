"""Loading a stage's data: a DataConfig to tokenized train and eval examples (read, tokenize,
split), and PPO's prompt files to token ids (checked against the model's context). What was
skipped or dropped is said on stderr at the end of loading, as well as in the run log."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .records import DataError, parser_for, read_jsonl
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
        raise DataError(f"{cfg.train_file}: no training examples left after tokenization")
    if info["skipped_lines"]:
        report(f"skipped {info['skipped_lines']} malformed line(s) (data.skip_malformed=true), the first: "
               f"{info['skipped_first'][0]}")
    if info["dropped_examples"]:
        report(f"dropped {info['dropped_examples']} example(s) whose prompt left no room for a response "
               f"within data.max_length={cfg.max_length}")
    return Examples(train_ex, eval_ex, records, info)


def report(message: str) -> None:
    """A line for the user on stderr (stdout is the command's result)."""
    print(f"fusedrl: {message}", file=sys.stderr)


def _parse_prompt(row: dict) -> str:
    prompt = row.get("prompt") if isinstance(row, dict) else None
    if not isinstance(prompt, str) or not prompt:
        raise ValueError('expected an object with a non-empty string "prompt"')
    return prompt


def load_prompts(path, tokenizer, max_prompt_length: int, max_model_len: int,
                 truncate_to_context: bool = False) -> tuple[list[list[int]], int]:
    """Token ids of every prompt in a JSONL file of {"prompt": ...} lines (each keeps its last
    max_prompt_length tokens), and how many were cut to fit the context.

    A prompt must leave room for at least one generated token within max_model_len: otherwise a
    DataError naming file:line, or with truncate_to_context its last max_model_len - 1 tokens.
    """
    read = read_jsonl(path, _parse_prompt)
    prompts, truncated = [], 0
    for text, lineno in zip(read.records, read.lines):
        ids = tokenize_prompt(tokenizer, text, max_prompt_length)
        if len(ids) >= max_model_len:
            if not truncate_to_context:
                raise DataError(f"{path}:{lineno}: the prompt has {len(ids)} tokens, which leaves no room to "
                                f"generate within the model's context of {max_model_len}; shorten it, lower "
                                "rollout.max_prompt_length, or set rollout.truncate_prompts=true")
            ids, truncated = ids[-(max_model_len - 1):], truncated + 1
        prompts.append(ids)
    if truncated:
        report(f"{path}: {truncated} prompt(s) cut to their last {max_model_len - 1} tokens to fit the "
               "model's context (rollout.truncate_prompts=true)")
    return prompts, truncated
