"""Supervised fine-tuning: next-token loss on response tokens only (the prompt is context).

`train_sft(SFTConfig(...))` trains and exports RUN_DIR/final, a transformers-loadable directory.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config.compatibility import refuse_for_vision
from ..config.train import SFTConfig
from ..data.loading import load_examples
from ..data.packing import PackedBatch, collate_sft
from ..model.hf_io import load_model
from ..model.lm_head import lm_head_logprobs
from ..model.moe import dropped_assignments
from ..train import adapters
from ..runs.run_dir import releases_output_dir
from ..train.run_setup import start_run
from ..parallel.context_parallel import shard_logprobs
from ..parallel.layout import layout_at_load
from ..plan.check import supervised_startup_check
from ..train.captured_forwards import CapturedLoss
from ..train.captured_micro_batch import Column
from ..train.router_losses import with_router_losses
from ..train.supervised import Stage, train
from ..train.vision_tower import set_vision_trainable


def target_nll_sum(model, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """-sum of log p(target) over the batch's targets (fp32 scalar); hidden [N, H] of the batch."""
    return -lm_head_logprobs(hidden.index_select(0, batch.target_rows), model.lm_head.weight,
                             batch.target_ids).sum()


def sft_counts(batch: PackedBatch) -> dict:
    return {"tokens": batch.num_targets}


def sft_loss(model, batch: PackedBatch, step_counts: dict):
    """Mean NLL over the step's response tokens (this micro-batch's share of it); context-parallel,
    each rank of the group forwards its shard of the batch and computes the same whole loss."""
    if model.context_parallel is not None:
        nll_sum = -shard_logprobs(model, batch, model.context_parallel).sum()
    else:
        hidden = model.forward_packed(batch.input_ids, batch.seqlens, batch.positions,
                                      batch.cu_seqlens, **batch.image_inputs())  # [N, H]
        nll_sum = target_nll_sum(model, hidden, batch)
    stats = {"nll_sum": nll_sum.detach()}
    if (dropped := dropped_assignments(model)) is not None:  # fixed-capacity expert parallelism
        stats["expert_dropped"] = dropped
    return nll_sum / max(step_counts["tokens"], 1), stats


def sft_graph_loss(model):
    """The SFT loss of a captured forward (captured_forwards.py): -sum of log p(label) x weight
    over the padded pack's rows (hidden [rows, H]); the weight is 1 / the step's response tokens at
    a target's row, 0 elsewhere (the prompt's rows and the filler's)."""
    def loss(hidden, columns):
        logp = lm_head_logprobs(hidden, model.lm_head.weight, columns["labels"])
        return -(logp * columns["weight"]).sum()
    return loss


def sft_graph_values(batch: PackedBatch, step_counts: dict) -> dict:
    """The columns of a captured forward (labels, weight [N] on the batch's device): each target's
    id and 1 / the step's response tokens at the row predicting it, 0 elsewhere."""
    n, device = batch.input_ids.shape[0], batch.input_ids.device
    labels = torch.zeros(n, dtype=torch.int64, device=device)
    weight = torch.zeros(n, dtype=torch.float32, device=device)
    return {"labels": labels.index_copy_(0, batch.target_rows, batch.target_ids),
            "weight": weight.index_fill_(0, batch.target_rows,
                                         1.0 / max(step_counts["tokens"], 1))}


SFT_CAPTURED = CapturedLoss(
    columns={"labels": Column(torch.int64, 0), "weight": Column(torch.float32, 0.0)},
    make_loss=sft_graph_loss, values=sft_graph_values,
    stats=lambda loss, outputs, batch, step_counts: {
        "nll_sum": loss * max(step_counts["tokens"], 1)})


def sft_summarize(stats: dict, counts: dict) -> dict:
    loss = stats["nll_sum"] / max(counts["tokens"], 1)
    moe = {name: stats[name] for name in ("router_aux_loss", "router_z_loss", "expert_dropped")
           if name in stats}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "target_tokens": counts["tokens"], **moe}


def _batch_share(batch: PackedBatch, step_counts: dict) -> float:
    return batch.num_targets / max(step_counts["tokens"], 1)


def sft_stage(dtype: str, device, sharder=None, router=None) -> Stage:
    """sharder: how a resumed model is sharded at load (hf_io.load_model); router: the `moe` section
    (router losses added to the loss of an MoE model's forwards)."""
    loss = with_router_losses(sft_loss, router, _batch_share) if router is not None else sft_loss
    return Stage(collate=collate_sft, counts=sft_counts, loss=loss, summarize=sft_summarize,
                 load_weights=lambda path: load_model(path, dtype=dtype, device=device,
                                                      shard=sharder),
                 captured=SFT_CAPTURED)


@releases_output_dir
def train_sft(cfg: SFTConfig, dataset=None, eval_dataset=None, callbacks=()) -> Path:
    """Train per `cfg`; returns the exported model directory (RUN_DIR/final; with lora.rank > 0 the
    adapters merged into it, and themselves in RUN_DIR/final_adapter). dataset, eval_dataset:
    datasets.Dataset objects read instead of cfg.data.train_file and cfg.data.eval_file;
    callbacks: the program's (engine/train/callbacks.py)."""
    run = start_run(cfg.seed, cfg.train, cfg.output_dir, *cfg.paths(), kind="sft", config=cfg,
                    check=supervised_startup_check)
    cfg = run.config  # train.gradient_checkpointing=auto resolved
    if run.processor is not None:
        refuse_for_vision(cfg)
    examples = load_examples(cfg.data, run.data_reader, "sft", cfg.seed, dataset, eval_dataset)
    sharder = layout_at_load("adapted" if cfg.lora.enabled else "trained", run.dims)
    model = load_model(cfg.model, dtype=run.dtype, device=run.device, shard=sharder)
    set_vision_trainable(model, cfg.train.train_vision)
    lora = adapters.attach(model, cfg.lora)
    train(model, sft_stage(run.dtype, run.device, sharder, cfg.moe), examples.train, examples.eval,
          cfg, run.device, examples.info, lora, run.dims, callbacks)
    final = Path(cfg.output_dir) / "final"
    adapters.export(model, lora, final, cfg.model)
    return final
