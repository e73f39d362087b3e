"""Supervised fine-tuning: next-token loss on response tokens only (the prompt is context).

`run_sft(SFTConfig(...))` trains and exports RUN_DIR/final, a transformers-loadable directory.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..data.packing import SFTBatch, collate_sft
from ..model.hf_io import load_model, save_model
from .losses import token_nll_sum
from ..train.run_setup import prepare_run
from ..train.loop import Stage, train
from ..config.train import SFTConfig


def sft_counts(batch: SFTBatch) -> dict:
    return {"tokens": batch.num_targets}


def sft_loss(model, batch: SFTBatch, step_counts: dict):
    """Mean NLL over the step's response tokens (this micro-batch's share of it)."""
    hidden = model.forward_packed(batch.input_ids, batch.seqlens)          # [N, H]
    nll_sum = token_nll_sum(hidden, model.lm_head.weight, batch.labels)
    return nll_sum / max(step_counts["tokens"], 1), {"nll_sum": nll_sum.item()}


def sft_summarize(stats: dict, counts: dict) -> dict:
    loss = stats["nll_sum"] / max(counts["tokens"], 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": counts["tokens"]}


def sft_stage(model_dir: str, dtype: str, device) -> Stage:
    return Stage(collate=collate_sft, counts=sft_counts, loss=sft_loss, summarize=sft_summarize,
                 save_weights=lambda model, out: save_model(model, out, source_dir=model_dir),
                 load_weights=lambda path: load_model(path, dtype=dtype, device=device))


def run_sft(cfg: SFTConfig) -> Path:
    """Train per `cfg`; returns the exported model directory (RUN_DIR/final)."""
    setup = prepare_run(cfg, "sft")
    model = load_model(cfg.model, dtype=cfg.train.dtype, device=setup.device)
    stage = sft_stage(cfg.model, cfg.train.dtype, setup.device)
    train(model, stage, setup.examples.train, setup.examples.eval, cfg, setup.device, setup.examples.info)
    final = Path(cfg.output_dir) / "final"
    save_model(model, final, source_dir=cfg.model)
    return final
