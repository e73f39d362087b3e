"""Loading a stage's data: a DataConfig (or a datasets.Dataset) to tokenized train and eval
examples (read, tokenize, split). What was skipped or dropped is said on stderr at the end of
loading, as well as in the run log. RL prompts: data/prompts.py."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .records import DataError, located, parser_for
from .sources import is_dataset, read_records, source_name
from .tokenization import TokenizedExample, tokenize_record, tokenize_records
from .vision_processor import VisionProcessor
from .vision_rankings import VisionRanking, parse_vision_ranking, tokenize_vision_ranking
from .vision_rows import VisionRecord, parse_vision_row, tokenize_vision_record
from ..config.train import DataConfig


@dataclass
class Examples:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    records: list          # the training records (text), e.g. for the reward offset
    info: dict             # counts for the run log: rows skipped, examples dropped


def tokenize_all(records, where: list[str], tokenizer,
                 cfg: DataConfig) -> tuple[list[TokenizedExample], int]:
    """Tokenized examples and how many records were dropped for having no room for a response;
    a record that cannot be rendered is a DataError naming its row (`where`). Text records are
    tokenized in batches (tokenization.tokenize_records); a ValueError there is found again one
    record at a time, for its row."""
    out = None
    if not isinstance(tokenizer, VisionProcessor) and not any(
            isinstance(r, (VisionRecord, VisionRanking)) for r in records):
        try:
            out = tokenize_records(tokenizer, records, cfg.max_length, cfg.max_prompt_length)
        except ValueError:
            pass  # below, one record at a time
    if out is None:
        out = [located(location, _tokenized, record, tokenizer, cfg)
               for record, location in zip(records, where)]
    kept = [e for e in out if e is not None]
    return kept, len(out) - len(kept)


def _tokenized(record, tokenizer, cfg: DataConfig) -> TokenizedExample | None:
    """One record's example (None: no room for a response)."""
    if isinstance(record, VisionRecord):
        return tokenize_vision_record(tokenizer, record, cfg.max_length, cfg.max_prompt_length)
    if isinstance(record, VisionRanking):
        return tokenize_vision_ranking(tokenizer, record, cfg.max_length, cfg.max_prompt_length)
    return tokenize_record(tokenizer, record, cfg.max_length, cfg.max_prompt_length)


def split_off(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded `fraction` of range(n), at least one when > 0."""
    if fraction == 0 or n < 2:
        return list(range(n)), []
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(max(1, round(n * fraction)), n - 1)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def load_examples(cfg: DataConfig, tokenizer, stage: str, seed: int, dataset=None,
                  eval_dataset=None) -> Examples:
    """Read cfg.train_file, or `dataset` (and cfg.eval_file or `eval_dataset`, or hold out
    cfg.eval_fraction) for stage sft|rm. With a VisionProcessor as `tokenizer` (a vision model),
    rows are read by data/vision_rows.py (sft) and data/vision_rankings.py (rm), with or without
    images."""
    source = dataset if dataset is not None else cfg.train_file
    parse = _parser(cfg, tokenizer, stage, source)
    train = read_records(source, parse, cfg.skip_malformed, cfg.columns())
    records, where = train.records, train.where
    info = {"skipped_lines": train.skipped, "skipped_first": train.errors[:5]}
    held_source = eval_dataset if eval_dataset is not None else cfg.eval_file or None
    if held_source is not None:
        if _same_file(held_source, source):
            report(f"data.eval_file is data.train_file ({held_source}): the eval loss is the "
                   "training rows' own, which says nothing of held-out data; leave "
                   "data.eval_file unset to hold out data.eval_fraction of the file instead")
        held = read_records(held_source, _parser(cfg, tokenizer, stage, held_source),
                            cfg.skip_malformed, cfg.columns())
        eval_records, eval_where = held.records, held.where
        info["skipped_lines"] += held.skipped
        info["skipped_first"] += held.errors[:5]
    else:
        keep, held_out = split_off(len(records), cfg.eval_fraction, seed)
        eval_records, eval_where = [records[i] for i in held_out], [where[i] for i in held_out]
        records, where = [records[i] for i in keep], [where[i] for i in keep]
    train_ex, dropped = tokenize_all(records, where, tokenizer, cfg)
    eval_ex, dropped_eval = tokenize_all(eval_records, eval_where, tokenizer, cfg)
    info.update(train_examples=len(train_ex), eval_examples=len(eval_ex),
                dropped_examples=dropped + dropped_eval)
    if not train_ex:
        raise DataError(f"{source_name(source)}: no training examples left after tokenization")
    if info["skipped_lines"]:
        report(f"skipped {info['skipped_lines']} malformed row(s) (data.skip_malformed=true), the "
               f"first: {info['skipped_first'][0]}")
    if info["dropped_examples"]:
        report(
            f"dropped {info['dropped_examples']} example(s) whose prompt left no room for a "
            f"response within data.max_length={cfg.max_length}, or whose cut to "
            f"data.max_prompt_length={cfg.max_prompt_length} would reach an image")
    return Examples(train_ex, eval_ex, records, info)


def _same_file(a, b) -> bool:
    """Whether two data sources are one file on disk (datasets objects never are)."""
    if is_dataset(a) or is_dataset(b):
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:  # either missing: read_records names it
        return False


def _parser(cfg: DataConfig, tokenizer, stage: str, source):
    """The row parser of `stage`: data/records.py's, or for a vision model data/vision_rows.py's
    (relative image paths from the data file's folder)."""
    if not isinstance(tokenizer, VisionProcessor):
        return parser_for(stage, cfg.format, all_turns=cfg.train_on == "assistant_turns")
    base = None if is_dataset(source) else Path(source).parent
    if stage == "rm":
        return lambda row: parse_vision_ranking(row, tokenizer, base)
    return lambda row: parse_vision_row(row, tokenizer, base, with_response=True)


def report(message: str) -> None:
    """A line for the user on stderr (stdout is the command's result)."""
    print(f"fusedrl: {message}", file=sys.stderr)
