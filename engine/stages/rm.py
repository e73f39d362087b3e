"""Reward-model training: InstructGPT's ranking loss, an optional LM term, reward normalization.

Loss of one optimizer step over E rankings (a pair is K = 2):
    mean_e [ mean_{i<j in e} -log sigmoid(r_i - r_j) ] + beta_rm * mean NLL over the best responses'
    tokens
The LM term is the imitation loss of Askell et al. 2021 used by MOSS-RLHF (the book's
"beta_rm E[log r'(x, y_w)]" with the sign of a loss to minimize: -log pi(y_w | x)), per token.
After training, `reward_offset` = mean raw reward of the reference responses, so they score 0.

With lora.rank > 0 the decoder is frozen and the adapters train with the score head (in full, fp32);
checkpoints hold them as a PEFT SEQ_CLS adapter directory (modules_to_save ["score"]), and the run
exports RUN_DIR/final_adapter/ (for `peft.PeftModel.from_pretrained` on
`AutoModelForSequenceClassification` of the base model, num_labels=1; reward_offset.json beside it)
and RUN_DIR/final/, the adapters merged: the same reward model format as a full run.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config.compatibility import refuse_for_vision
from ..config.train import RMConfig
from ..data.device_tensors import device_tensor
from ..data.loading import load_examples
from ..data.packing import PackedBatch, collate_rm, join_images, pack
from ..data.records import parser_for
from ..data.sources import read_records
from ..data.tokenization import tokenize_records
from ..errors import NonFiniteError
from ..model.hf_io import load_model
from ..model.reward_model import RewardModel, load_reward_model, save_reward_model
from ..train import adapters
from ..parallel.distributed import is_main
from ..runs.run_dir import releases_output_dir
from ..train.run_setup import start_run
from ..train.runlog import append_metrics
from ..parallel.layout import layout_at_load
from ..plan.check import supervised_startup_check
from ..train.supervised import Stage, train
from ..train.vision_tower import set_vision_trainable
from ..train.captured_forwards import CapturedLoss
from ..train.captured_micro_batch import Column
from .sft import SFT_CAPTURED, sft_graph_loss, sft_graph_values, target_nll_sum


def ranking_pairs(group_sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every ranking's K-choose-2 pairs over a batch's rows, built on the host: rows [2, P] int64
    (row i, then row j: i < j in one ranking, its rows consecutive and best first, so i is
    preferred to j), the pairs in ranking order and (i, j) order within one; weights [P] float64,
    1 / C(K, 2) of the pair's ranking (a K-way ranking weighs as much as a pair). ValueError for a
    ranking of fewer than 2 responses."""
    sizes = np.asarray(group_sizes, dtype=np.int64).reshape(-1)
    if (sizes < 2).any():
        raise ValueError(f"group_sizes={list(group_sizes)}: every ranking needs at least 2 "
                         "responses")
    starts = np.cumsum(sizes) - sizes
    rows, weights = [], []
    for k in np.unique(sizes):  # the rankings of each size at once (a batch has one or a few)
        i, j = np.triu_indices(k, 1)
        first = starts[sizes == k][:, None]                          # [G_k, 1]
        rows.append(np.stack([(first + i).ravel(), (first + j).ravel()]))
        weights.append(np.full(rows[-1].shape[1], 2.0 / (k * (k - 1))))
    rows, weights = np.concatenate(rows, axis=1), np.concatenate(weights)
    order = np.lexsort((rows[1], rows[0]))  # rankings in batch order, then (i, j) order
    return np.ascontiguousarray(rows[:, order]), weights[order]


def ranking_loss_sum(rewards: torch.Tensor, group_sizes: list[int]) -> tuple[torch.Tensor,
                                                                             torch.Tensor, int]:
    """InstructGPT's reward-model loss, one ranking per batch element.

    rewards [S] fp32: scores of the S = sum(group_sizes) sequences, each group best first.
    Element e with K responses contributes mean over its K(K-1)/2 pairs of -log sigmoid(r_i - r_j),
    so a K-way ranking weighs as much as a pair (the paper's 1 / C(K, 2)) and its pairs share one
    forward. Returns (sum of element losses, number of pairs ranked correctly, number of pairs); a
    tie (equal rewards, e.g. from the zero-initialized head) counts as not correct.

    Every pair of the batch at once (ranking_pairs: its indices and weights sent in two copies):
    the same launches for 2 rankings as for 200. A loop over the rankings launched ~19 kernels for
    each, forward and backward: 434 of the 606 launches of a micro-batch of the demo's reward
    model (23 pairs; 181 in all now), each one host time on a GPU.
    """
    if rewards.dim() != 1 or rewards.shape[0] != sum(group_sizes):
        raise ValueError(f"rewards is {tuple(rewards.shape)}: expected [{sum(group_sizes)}], one "
                         f"score per response of group_sizes={list(group_sizes)}")
    rows, weights = ranking_pairs(group_sizes)
    rows = device_tensor(rows, torch.int64, rewards.device)                 # [2, P]
    weights = device_tensor(weights, rewards.dtype, rewards.device)          # [P]
    preferred, other = rewards.index_select(0, rows.view(-1)).view(2, -1)
    margin = preferred - other                                               # [P]
    return -(F.logsigmoid(margin) * weights).sum(), (margin > 0).sum(), margin.shape[0]


def rm_counts(batch: PackedBatch) -> dict:
    return {"examples": len(batch.group_sizes), "lm_tokens": batch.num_targets}


def rm_loss(model: RewardModel, batch: PackedBatch, step_counts: dict, beta_rm: float):
    """This micro-batch's share of the step loss (see the module docstring), and summable stats."""
    # [N, H]
    hidden = model.forward_packed(batch.input_ids, batch.seqlens, batch.positions, batch.cu_seqlens,
                                  **batch.image_inputs())
    rewards = model.raw_rewards(hidden, batch.seqlens)                      # [S]
    rank_sum, correct, pairs = ranking_loss_sum(rewards, batch.group_sizes)
    loss = rank_sum / max(step_counts["examples"], 1)
    stats = {"rank_sum": rank_sum.detach(), "correct": correct, "pairs": pairs}
    if beta_rm > 0:
        nll_sum = target_nll_sum(model, hidden, batch)
        loss = loss + beta_rm * nll_sum / max(step_counts.get("lm_tokens", 0), 1)
        stats["nll_sum"] = nll_sum.detach()
    return loss, stats


def rm_graph_loss(beta_rm: float):
    """make_loss of the reward model's captured forward (captured_forwards.py): the ranking term
    over the pairs written in the columns (each pair's rows: the two sequences' last tokens, its
    weight: 1 / C(K, 2) / the step's rankings; pads weigh 0), plus beta_rm x the LM term as SFT's;
    outputs: the two terms and the pairs ranked correctly."""
    def make(model):
        def loss(hidden, columns):
            scores = model.score(hidden).squeeze(-1)                            # [rows] fp32
            margin = (scores.index_select(0, columns["preferred"])
                      - scores.index_select(0, columns["other"]))               # [rows]
            weight = columns["pair_weight"]
            outputs = {"rank": -(F.logsigmoid(margin) * weight).sum(),
                       "correct": ((margin > 0) & (weight > 0)).sum()}
            total = outputs["rank"]
            if beta_rm > 0:
                outputs["lm"] = sft_graph_loss(model)(hidden, columns)
                total = total + beta_rm * outputs["lm"]
            return total, outputs
        return loss
    return make


def rm_graph_values(batch: PackedBatch, step_counts: dict, beta_rm: float) -> dict:
    """The columns of a captured forward ([N] each, on the batch's device): the pairs of the
    pack's rankings in the first P rows (preferred and other: the last rows of their sequences;
    pair_weight: 1 / C(K, 2) / the step's rankings), zeros after them; with beta_rm, SFT's labels
    and weights over the best responses' tokens (1 / the step's LM tokens)."""
    n, device = batch.input_ids.shape[0], batch.input_ids.device
    pairs, weights = ranking_pairs(batch.group_sizes)                        # [2, P], [P]
    last = np.cumsum(batch.seqlens, dtype=np.int64) - 1
    rows = np.zeros((2, n), dtype=np.int64)
    rows[:, :pairs.shape[1]] = last[pairs]
    pair_weight = np.zeros(n, dtype=np.float32)
    pair_weight[:pairs.shape[1]] = weights / max(step_counts["examples"], 1)
    preferred, other = device_tensor(rows, torch.int64, device)   # one copy of both
    values = {"preferred": preferred, "other": other,
              "pair_weight": device_tensor(pair_weight, torch.float32, device)}
    if beta_rm > 0:
        values.update(sft_graph_values(batch, {"tokens": step_counts.get("lm_tokens", 0)}))
    return values


def pair_count(group_sizes: list[int]) -> int:
    """The pairs of rankings of these sizes: C(K, 2) each."""
    return sum(k * (k - 1) // 2 for k in group_sizes)


def rm_graph_pairs_fit(batch: PackedBatch) -> bool:
    """Whether the pack's pairs fit its rows (a column holds one pair a row): always for pairs;
    not for a ranking of many one-token responses."""
    return pair_count(batch.group_sizes) <= batch.input_ids.shape[0]


def rm_captured(beta_rm: float) -> CapturedLoss:
    """The reward model's loss as its captured forwards compute it (train.cuda_graphs)."""
    columns = {"preferred": Column(torch.int64, 0), "other": Column(torch.int64, 0),
               "pair_weight": Column(torch.float32, 0.0)}
    if beta_rm > 0:
        columns.update(SFT_CAPTURED.columns)

    def stats(loss, outputs, batch, step_counts):
        out = {"rank_sum": outputs["rank"] * max(step_counts["examples"], 1),
               "correct": outputs["correct"],
               "pairs": pair_count(batch.group_sizes)}
        if beta_rm > 0:
            out["nll_sum"] = outputs["lm"] * max(step_counts.get("lm_tokens", 0), 1)
        return out
    def unreached(model):
        # Without the LM term an untied LM head takes no gradient: its .grad stays None (an
        # optimizer would decay a zero gradient's weight, as it does not in the eager step).
        head = model.lm_head.weight
        return () if beta_rm > 0 or head is model.model.embed_tokens.weight else (head,)
    return CapturedLoss(columns, rm_graph_loss(beta_rm),
                        lambda batch, step_counts: rm_graph_values(batch, step_counts, beta_rm),
                        stats, rm_graph_pairs_fit, unreached)


def rm_summarize(stats: dict, counts: dict, beta_rm: float) -> dict:
    rank_loss = stats["rank_sum"] / max(counts["examples"], 1)
    out = {"rank_loss": rank_loss, "accuracy": stats["correct"] / max(stats["pairs"], 1),
           "pairs": stats["pairs"]}
    # A step whose best responses hold no target has no lm_tokens (sums drop zero counts)
    lm_nll = stats.get("nll_sum", 0.0) / max(counts.get("lm_tokens", 0), 1)
    if beta_rm > 0:
        out["lm_nll"] = lm_nll
    return {"loss": rank_loss + beta_rm * lm_nll, **out}


def rm_stage(cfg: RMConfig, dtype: torch.dtype, device, sharder=None) -> Stage:
    return Stage(collate=collate_rm, counts=rm_counts,
                 loss=lambda model, batch, counts: rm_loss(model, batch, counts, cfg.beta_rm),
                 summarize=lambda stats, counts: rm_summarize(stats, counts, cfg.beta_rm),
                 load_weights=lambda path: load_reward_model(path, dtype=dtype, device=device,
                                                             shard=sharder),
                 captured=rm_captured(cfg.beta_rm))


def reference_sequences(cfg: RMConfig, tokenizer, records: list) -> list[list[int]]:
    """Token ids (prompt + response, rendered as in training) of the responses that define reward 0:
    the demonstrations of cfg.reference_file, else the best response of each training ranking; at
    most max_reference."""
    if cfg.reference_file:
        parse = parser_for("sft", "auto", all_turns=cfg.data.train_on == "assistant_turns")
        records = read_records(cfg.reference_file, parse, cfg.data.skip_malformed,
                               cfg.data.columns()).records
    examples = tokenize_records(tokenizer, records[: cfg.max_reference], cfg.data.max_length,
                                cfg.data.max_prompt_length)
    return [e.prompt + e.responses[0] for e in examples if e is not None]


def vision_references(cfg: RMConfig, processor, train: list) -> tuple[list[list[int]], list]:
    """reference_sequences for a vision model, with each sequence's images (ImageInputs or None):
    the demonstrations of cfg.reference_file read as SFT rows with images, else the best
    response of each training example (`train`, tokenized); at most max_reference."""
    if cfg.reference_file:
        data = dataclasses.replace(cfg.data, train_file=cfg.reference_file, eval_file=None,
                                   eval_fraction=0.0)
        train = load_examples(data, processor, "sft", cfg.seed).train
    chosen = train[: cfg.max_reference]
    return [ex.prompt + ex.responses[0] for ex in chosen], [ex.images for ex in chosen]


@torch.no_grad()
def mean_raw_reward(model: RewardModel, sequences: list[list[int]], budget: int, device,
                    images: list | None = None) -> float:
    """Mean raw score of `sequences`, scored in packed batches of at most `budget` tokens;
    `images`: each sequence's ImageInputs (None: text), for a vision-language model."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device, read once
    for group in pack([len(s) for s in sequences], budget):
        seqs = [sequences[i] for i in group]
        ids = device_tensor(sum(seqs, []), torch.int64, device)
        pixels, grids, _ = join_images(None if images is None else [images[i] for i in group],
                                       device)
        hidden = model.forward_packed(ids, [len(s) for s in seqs], **(
            {} if pixels is None else {"pixel_values": pixels, "image_grid_thw": grids}))
        total += model.raw_rewards(hidden, [len(s) for s in seqs]).sum()
    model.train()
    return total.item() / len(sequences)


@releases_output_dir
def train_rm(cfg: RMConfig, dataset=None, eval_dataset=None, callbacks=()) -> Path:
    """Train per `cfg`, normalize, export RUN_DIR/final (see engine/model/reward_model.py for the
    format; with lora.rank > 0 also RUN_DIR/final_adapter, see the module docstring). dataset,
    eval_dataset: datasets.Dataset objects read instead of cfg.data.train_file and
    cfg.data.eval_file; callbacks: the program's (engine/train/callbacks.py)."""
    run = start_run(cfg.seed, cfg.train, cfg.output_dir, *cfg.paths(), kind="rm", config=cfg,
                    check=supervised_startup_check)
    cfg = run.config  # train.gradient_checkpointing=auto resolved
    device, tokenizer = run.device, run.tokenizer
    if run.processor is not None:
        refuse_for_vision(cfg)
    examples = load_examples(cfg.data, run.data_reader, "rm", cfg.seed, dataset, eval_dataset)
    # The trained score head stays whole on every rank beside LoRA adapters (a replicated head).
    sharder = layout_at_load("adapted" if cfg.lora.enabled else "trained", run.dims,
                             lambda model: [model.score] if cfg.lora.enabled else [])
    # the head starts at zero: see reward_model_from_lm
    model = load_model(cfg.model, dtype=run.dtype, device=device, model_cls=RewardModel,
                       shard=sharder, fresh=["score.weight"])
    set_vision_trainable(model, cfg.train.train_vision)
    lora = adapters.attach(model, cfg.lora, {"score": model.score})
    state = train(model, rm_stage(cfg, run.dtype, device, sharder), examples.train, examples.eval,
                  cfg, device, examples.info, lora, run.dims, callbacks)
    references, images = (reference_sequences(cfg, tokenizer, examples.records), None
                          ) if run.processor is None else vision_references(cfg, run.processor,
                                                                            examples.train)
    # Every rank scores all references (the sharded forward is collective), so all agree on it.
    model.reward_offset = mean_raw_reward(model, references, cfg.data.tokens_per_batch, device,
                                          images)
    if not math.isfinite(model.reward_offset):  # PPO against it would skip every update
        raise NonFiniteError(
            f"the trained reward model scores the {len(references)} reference responses "
            f"{model.reward_offset} on average (reward_offset); the run diverged, nothing exported")
    if is_main():
        append_metrics(cfg.output_dir, "info", state.step, {"reward_offset": model.reward_offset,
                                                            "reference_responses": len(references)})
    final = Path(cfg.output_dir) / "final"
    adapters.export(model, lora, final, cfg.model, save_reward_model, model.reward_offset)
    return final
