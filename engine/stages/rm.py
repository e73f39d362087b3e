"""Reward-model training: InstructGPT's ranking loss, an optional LM term, reward normalization.

Loss of one optimizer step over E rankings (a pair is K = 2):
    mean_e [ mean_{i<j in e} -log sigmoid(r_i - r_j) ] + beta_rm * mean NLL over the best responses' tokens
The LM term is the imitation loss of Askell et al. 2021 used by MOSS-RLHF (the book's
"beta_rm E[log r'(x, y_w)]" with the sign of a loss to minimize: -log pi(y_w | x)), per token.
After training, `reward_offset` = mean raw reward of the reference responses, so they score 0.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.packing import RMBatch, collate_rm, pack
from ..model.hf_io import load_model
from ..data.records import Ranking, parser_for, read_jsonl
from .losses import ranking_loss_sum, token_nll_sum
from ..model.reward_model import RewardModel, load_reward_model, reward_model_from_lm, save_reward_model
from ..train.runlog import append_metrics
from ..train.run_setup import prepare_run
from ..data.tokenization import tokenize_prompt, tokenize_response
from ..train.loop import Stage, train
from ..config.train import RMConfig


def rm_counts(batch: RMBatch) -> dict:
    return {"examples": len(batch.group_sizes), "lm_tokens": batch.num_lm_targets}


def rm_loss(model: RewardModel, batch: RMBatch, step_counts: dict, beta_rm: float):
    """This micro-batch's share of the step loss (see the module docstring), and summable stats."""
    hidden = model.forward_packed(batch.input_ids, batch.seqlens)           # [N, H]
    rewards = model.raw_rewards(hidden, batch.seqlens)                      # [S]
    rank_sum, correct, pairs = ranking_loss_sum(rewards, batch.group_sizes)
    loss = rank_sum / max(step_counts["examples"], 1)
    stats = {"rank_sum": rank_sum.item(), "correct": correct.item(), "pairs": pairs}
    if beta_rm > 0:
        nll_sum = token_nll_sum(hidden, model.lm_head.weight, batch.lm_labels)
        loss = loss + beta_rm * nll_sum / max(step_counts["lm_tokens"], 1)
        stats["nll_sum"] = nll_sum.item()
    return loss, stats


def rm_summarize(stats: dict, counts: dict, beta_rm: float) -> dict:
    rank_loss = stats["rank_sum"] / max(counts["examples"], 1)
    out = {"rank_loss": rank_loss, "accuracy": stats["correct"] / max(stats["pairs"], 1),
           "pairs": stats["pairs"]}
    lm_nll = stats.get("nll_sum", 0.0) / max(counts["lm_tokens"], 1)
    if beta_rm > 0:
        out["lm_nll"] = lm_nll
    return {"loss": rank_loss + beta_rm * lm_nll, **out}


def rm_stage(cfg: RMConfig, device) -> Stage:
    return Stage(collate=collate_rm, counts=rm_counts,
                 loss=lambda model, batch, counts: rm_loss(model, batch, counts, cfg.beta_rm),
                 summarize=lambda stats, counts: rm_summarize(stats, counts, cfg.beta_rm),
                 save_weights=lambda model, out: save_reward_model(model, out, source_dir=cfg.model),
                 load_weights=lambda path: load_reward_model(path, dtype=cfg.train.dtype, device=device))


def reference_sequences(cfg: RMConfig, tokenizer, records: list) -> list[list[int]]:
    """Token ids (prompt + response) of the responses that define reward 0: the demonstrations of
    cfg.reference_file, else the best response of each training ranking; at most max_reference."""
    if cfg.reference_file:
        records = read_jsonl(cfg.reference_file, parser_for("sft", "demonstration"), cfg.data.skip_malformed).records
        pairs = [(r.prompt, r.response) for r in records]
    else:
        pairs = [(r.prompt, r.responses[0]) for r in records if isinstance(r, Ranking)]
    out = []
    for prompt, response in pairs[: cfg.max_reference]:
        ids = tokenize_prompt(tokenizer, prompt, cfg.data.max_prompt_length)
        out.append(ids + tokenize_response(tokenizer, response, cfg.data.max_length - len(ids)))
    return out


@torch.no_grad()
def mean_raw_reward(model: RewardModel, sequences: list[list[int]], budget: int, device) -> float:
    """Mean raw score of `sequences`, scored in packed batches of at most `budget` tokens."""
    model.eval()
    total = 0.0
    for group in pack([len(s) for s in sequences], budget):
        seqs = [sequences[i] for i in group]
        ids = torch.tensor(sum(seqs, []), device=device)
        hidden = model.forward_packed(ids, [len(s) for s in seqs])
        total += model.raw_rewards(hidden, [len(s) for s in seqs]).sum().item()
    model.train()
    return total / len(sequences)


def run_rm(cfg: RMConfig) -> Path:
    """Train per `cfg`, normalize, export RUN_DIR/final (see engine/reward_model.py for the format)."""
    setup = prepare_run(cfg, "rm")
    lm = load_model(cfg.model, dtype=cfg.train.dtype, device=setup.device)
    model = reward_model_from_lm(lm)
    del lm
    state = train(model, rm_stage(cfg, setup.device), setup.examples.train, setup.examples.eval, cfg,
                  setup.device, setup.examples.info)
    references = reference_sequences(cfg, setup.tokenizer, setup.examples.records)
    model.reward_offset = mean_raw_reward(model, references, cfg.data.tokens_per_batch, setup.device)
    append_metrics(cfg.output_dir, "info", state.step, {"reward_offset": model.reward_offset,
                                                        "reference_responses": len(references)})
    final = Path(cfg.output_dir) / "final"
    save_reward_model(model, final, source_dir=cfg.model)
    return final
