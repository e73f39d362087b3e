"""GKD's mixing (distill.lmbda): an iteration distills either on the student's own samples or on
the dataset's completions of the same prompt stream, decided by a coin seeded by the run's seed
and the iteration (so a resumed run decides as the first did). A completion is read as SFT reads
a prompt+completion row (TRL's format: strings, or message lists through the chat template, where
only the assistant's tokens are targets) and enters the same pack, teacher forward and update as
a sample would, one row per prompt."""
from __future__ import annotations

import random

import torch

from ...config.distill import DistillConfig
from ...data.prompts import PromptRow
from ...data.records import DataError, parser_for
from ...data.tokenization import tokenize_records
from ..rollout.sampled_rows import Generated


def on_policy(cfg: DistillConfig, iteration: int) -> bool:
    """Whether iteration `iteration` distills on the student's samples (probability lmbda)."""
    lmbda = cfg.distill.lmbda
    return lmbda == 1 or random.Random(cfg.seed * 1_000_003 + iteration).random() < lmbda


def check_completions(prompts: list[PromptRow]) -> None:
    """DataError naming the first prompt row without a `completion` column (distill.lmbda < 1
    needs one on every row)."""
    for i, row in enumerate(prompts):
        if "completion" not in row.columns:
            raise DataError(f"prompts_file row {i + 1}: no `completion` column; distill.lmbda < 1 "
                            "distills on the dataset's completions (TRL's prompt-completion "
                            "format), or set distill.lmbda=1")


def completion_rows(rows: list[PromptRow], tokenizer, max_prompt_length: int,
                    max_new_tokens: int) -> Generated:
    """The rows' dataset completions as generated rows (n = 1). No sampler drew them: their
    sampler log-probs are zeros that nothing reads (the sampled mode and the reward's term, which
    read them, run on the student's samples only)."""
    parse = parser_for("sft", "prompt_completion")
    records = []
    for row in rows:
        try:
            records.append(parse({"prompt": row.prompt, "completion": row.columns["completion"]}))
        except ValueError as e:
            raise DataError(f"prompts_file, prompt {row.prompt!r}: {e}") from None
    examples = tokenize_records(tokenizer, records, max_prompt_length + max_new_tokens,
                                max_prompt_length)
    prompts, responses, masks = [], [], []
    for row, example in zip(rows, examples):
        if example is None or not example.responses[0]:
            raise DataError(f"prompts_file, prompt {row.prompt!r}: no completion token fits "
                            "rollout.max_prompt_length + rollout.max_new_tokens")
        prompts.append(example.prompt)
        responses.append(example.responses[0][:max_new_tokens])
        masks.append(list(example.masks[0][:max_new_tokens]) if example.masks else None)
    model_masks = masks if any(m is not None for m in masks) else None
    if model_masks is not None:
        model_masks = [m or [True] * len(r) for m, r in zip(masks, responses)]
    targets = sum(sum(m) for m in model_masks) if model_masks else sum(map(len, responses))
    return Generated(prompts, responses, torch.zeros(targets), 1, rows, model_masks)
