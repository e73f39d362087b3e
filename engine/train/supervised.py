"""The step of the supervised stages (SFT and reward model) inside the one training loop.

A `Stage` says what differs (batch building, loss, metrics, weight I/O); `train` does the rest:
micro-batch stream with a resumable position, gradient accumulation, clipping, AdamW (mixed
precision for bf16 weights) + schedule, held-out evaluation, driven by engine/train/loop.py.

Under torchrun the model is sharded (engine/parallel/distributed.py) and each rank takes its own
optim.grad_accum_steps micro-batches of data.tokens_per_batch tokens (both per rank, as in torchtune
and TRL): a step's global batch is grad_accum_steps x world_size micro-batches, consecutive in the
stream, rank r taking the r-th run of grad_accum_steps. The loss denominators (`step_counts`) are
summed over the ranks, so the step equals one process's with grad_accum_steps x world_size.

With train.context_parallel=C a context group's C ranks take the same micro-batches, each forwarding
its shard of every one (engine/parallel/context_parallel.py) and computing the same whole loss.

The forwards are cut apart from the data: with data.tokens_per_microbatch a rank's examples of the
step are packed, in order, into forwards of at most that many tokens (`step_forwards`). The loss is
divided by the step's counts, not a forward's, so the cut leaves the step's gradient as it is.

A forward's stats stay on the device and add up there (floating ones in float64, as Python would
add their values); the step reads them, its loss and its gradient norm with one host sync.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..config.train import DataConfig, StageConfig
from ..data.packing import epoch_batches, pack
from ..data.tokenization import TokenizedExample
from ..errors import UsageError
from ..parallel import distributed
from ..parallel.dims import ParallelDims
from ..parallel.layout import layout
from . import adapters, optim
from .captured_forwards import CapturedForwards, CapturedLoss, blocker
from .checkpoint import SavedModel, Trainables
from .loop import RunPlan, run_training
from . import runlog
from .runlog import peak_memory_mb


@dataclass
class Stage:
    """The stage-specific parts, as plain functions.

    counts(batch) -> denominators the batch adds to its step ({"tokens": ...}); loss(model, batch,
    step_counts) -> (loss already divided by the step's counts, summable stats: 0-dim tensors or
    Python numbers, read on the host once per step); summarize(stats, counts) -> metrics from the
    stats' host values (for train steps and for eval); captured: the same loss as a CUDA graph
    computes it (train.cuda_graphs; captured_forwards.py), None where the stage has none.
    """

    collate: Callable
    counts: Callable
    loss: Callable
    summarize: Callable
    # directory -> model (a checkpoint of the earlier layout's model directory)
    load_weights: Callable
    captured: CapturedLoss | None = None


@dataclass
class DataPosition:
    """Where a micro-batch stream stands: the epoch of the next micro-batch and how many of that
    epoch's micro-batches were consumed (with the seed, a complete data position for resuming)."""
    epoch: int = 0
    batch_index: int = 0


@dataclass
class SupervisedState(DataPosition):
    step: int = 0          # optimizer steps done
    tokens: int = 0        # training tokens seen (for the log)


def micro_batches(examples: list[TokenizedExample], budget: int, seed: int, position: DataPosition
                  ) -> Iterator[tuple[int, int, list[TokenizedExample]]]:
    """(epoch, index, examples) from `position` on, epoch after epoch, without end."""
    epoch, index = position.epoch, position.batch_index
    while True:
        batches = epoch_batches(examples, budget, seed, epoch)
        for i in range(index, len(batches)):
            yield epoch, i, batches[i]
        epoch, index = epoch + 1, 0


def check_context(data: DataConfig, max_model_len: int) -> None:
    """data.max_length must fit the model's context (checked from config.json before any model
    loads)."""
    if data.max_length > max_model_len:
        raise UsageError(f"data.max_length={data.max_length} exceeds the model's context of "
                         f"{max_model_len} tokens (max_position_embeddings); set "
                         f"data.max_length<={max_model_len}")


def held_out_notice(data: DataConfig, train_count: int, eval_count: int) -> list[str]:
    """The run's notice that data.eval_fraction of the training file is held out for evaluation
    (not trained on), when it is."""
    if data.eval_file or not eval_count:
        return []
    return [f"evaluating on {eval_count} of the {train_count + eval_count} examples of "
            f"data.train_file, held out (data.eval_fraction={data.eval_fraction}) and not trained "
            "on; data.eval_file=FILE evaluates on a file instead, data.eval_fraction=0 trains on "
            "all"]


def same_rows(train) -> int:
    """The consecutive ranks that take the same micro-batches: a tensor group's (T), each of its
    ranks a context group's (C) alike."""
    return train.tensor_parallel * train.context_parallel


def micro_batches_per_step(cfg: StageConfig) -> int:
    """The global batch of one optimizer step, in micro-batches: every data rank's
    grad_accum_steps."""
    return cfg.optim.grad_accum_steps * distributed.world_size() // same_rows(cfg.train)


def total_steps(examples: list[TokenizedExample], cfg: StageConfig) -> int:
    """Optimizer steps of the run: train.max_steps, else whole steps in train.epochs epochs."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    n = sum(len(epoch_batches(examples, cfg.data.tokens_per_batch, cfg.seed, e))
            for e in range(cfg.train.epochs))
    return max(n // micro_batches_per_step(cfg), 1)


def step_forwards(stage: Stage, groups: list[list[TokenizedExample]], budget: int | None) -> list:
    """This rank's forwards of one step, collated. groups: its data micro-batches of the step, in
    stream order; budget None: one forward each; else data.tokens_per_microbatch: their examples,
    in the same order, packed greedily into forwards of at most `budget` tokens."""
    if budget is not None:
        examples = [ex for group in groups for ex in group]
        cut = pack([ex.num_tokens for ex in examples], budget, "tokens_per_microbatch")
        groups = [[examples[i] for i in forward] for forward in cut]
    return [stage.collate(group) for group in groups]


def captured_forwards(model, stage: Stage, cfg: StageConfig, device, lora=None
                      ) -> CapturedForwards | None:
    """train.cuda_graphs: the run's training forwards, each replayed from a CUDA graph
    (captured_forwards.py; buckets of the run's token budget of one forward), or None when off. A
    UsageError in one line where the run cannot (the model laid out and its recompute set)."""
    if not cfg.train.cuda_graphs:
        return None
    why = blocker(model, device, stage.captured, model.gradient_checkpointing, lora)
    if why is not None:
        raise UsageError(f"train.cuda_graphs=true: not supported here: {why}; set "
                         "train.cuda_graphs=false")
    budget = cfg.data.tokens_per_microbatch or cfg.data.tokens_per_batch
    return CapturedForwards(model, stage.captured, budget)


def add_stats(total: dict, stats: dict) -> dict:
    """Add a forward's stats into `total` (in place; returned): tensors stay on the device, a
    floating one in float64 so the sum is the one Python would make of the values."""
    for name, value in stats.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            value = value.double() if value.is_floating_point() else value
        total[name] = total[name] + value if name in total else value
    return total


def read_on_host(values: list) -> list:
    """0-dim tensors and Python numbers -> Python numbers, the tensors read with one (per device)
    host sync: a floating tensor as a float, an integer one as an int."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return list(values)
    host = iter(runlog.read_tensors(tensors))
    return [(next(host) if v.is_floating_point() else int(next(host)))
            if isinstance(v, torch.Tensor) else v
            for v in values]


def to_device(batch, device: torch.device):
    return type(batch)(
        *(x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x for x in batch))


def train_step(model, stage: Stage, batches: list, optimizer, scheduler, cfg: StageConfig, device,
               forwards: int | None = None, captured: CapturedForwards | None = None) -> dict:
    """One optimizer step over `batches` (this rank's forwards of the step, from step_forwards);
    returns the step's metrics over all ranks (the same on every rank, so all take the same skip).
    forwards: the most forwards any rank runs this step (default len(batches)). captured: each
    forward replayed from a CUDA graph instead (one process: see captured_forwards.blocker).
    A non-finite loss or gradient skips the step on the device (optim.clip_and_step): the step is
    queued before any metric is read, all of them with one host sync."""
    step_counts = distributed.all_reduce_sum(
        sum((Counter(stage.counts(b)) for b in batches), Counter()))
    stats: dict = {}
    optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=device)
    backwards = iter(range((forwards or len(batches)) - 1, -1, -1))  # backwards left after each

    def backward(loss):
        # FSDP averages over ranks (tensor-parallel: the counts are T times the data's, and
        # average_over_data averages over the data groups); the step sums. HSDP's gradients cross
        # the shard groups (the nodes) in the step's last backward only. Context-parallel: the
        # counts are C times the data's too, while FSDP's average over every rank is also the sum
        # over each context group of its parts of one gradient (context_parallel.py): times C.
        distributed.all_reduce_in_backward(model, next(backwards) == 0)
        (loss * distributed.world_size() * cfg.train.context_parallel).backward()

    for batch in batches:
        if captured is not None and captured.fits(batch):  # its backward is in the graph
            loss, batch_stats = captured.run(to_device(batch, device), step_counts)
        else:
            loss, batch_stats = stage.loss(model, to_device(batch, device), step_counts)
            backward(loss)
        step_loss = step_loss + loss.detach()
        add_stats(stats, batch_stats)
    # A token budget can cut the ranks' examples into different numbers of forwards: a rank with
    # fewer repeats its smallest one with its loss times 0 (the gradient and the stats unchanged).
    spare = min(batches, key=lambda b: len(b.input_ids))
    distributed.match_forwards(len(batches), forwards or len(batches),
                               lambda: backward(
                                   stage.loss(model, to_device(spare, device), step_counts)[0]
                                   * 0.0))
    step_loss = distributed.all_reduce_tensor(step_loss)  # every rank decides on the same losses
    if model.tensor_parallel is not None:
        model.tensor_parallel.average_over_data(optim.parameters(optimizer))
    grad_norm = optim.clip_and_step([optimizer], cfg.optim.max_grad_norm, step_loss)[0]
    *host_stats, grad_norm, loss_value = read_on_host([*stats.values(), grad_norm, step_loss])
    lr = scheduler.get_last_lr()[0]
    metrics = {
        **stage.summarize(distributed.all_reduce_sum(dict(zip(stats, host_stats))), step_counts),
        "lr": lr,
        "grad_norm": grad_norm}
    if not (math.isfinite(grad_norm) and math.isfinite(loss_value)):
        metrics.update(skipped=True,
                       skip_reason=f"non-finite loss or gradient (loss={metrics['loss']:.4g}, "
                                           f"grad_norm={grad_norm:.4g})")
    # a skipped step still uses its data and its place in the schedule
    optim.advance_schedule(scheduler)
    return metrics


@torch.no_grad()
def evaluate(model, stage: Stage, examples: list[TokenizedExample], cfg: StageConfig,
             device) -> dict:
    """Stage metrics over held-out `examples`, in eval mode and without gradients."""
    # The metrics are sums over the examples, so the forwards may take the training forwards'
    # budget.
    data = cfg.data
    budget, name = ((data.tokens_per_microbatch, "tokens_per_microbatch")
                    if data.tokens_per_microbatch
                    else (data.tokens_per_batch, "tokens_per_batch"))
    batches = [stage.collate(b) for b in epoch_batches(examples, budget, cfg.seed, 0, name)]
    counts = sum((Counter(stage.counts(b)) for b in batches), Counter())
    stats: dict = {}
    model.eval()
    for batch in batches:
        add_stats(stats, stage.loss(model, to_device(batch, device), counts)[1])
    model.train()
    return stage.summarize(Counter(dict(zip(stats, read_on_host(list(stats.values()))))), counts)


def train(model, stage: Stage, train_ex, eval_ex, cfg: StageConfig, device,
          log_info: dict | None = None, lora=None,
          dims: ParallelDims | None = None, callbacks=()) -> SupervisedState:
    """Train `model` in place for the configured steps, resuming from the newest checkpoint in
    cfg.output_dir when train.resume is set. Returns the final state. Under torchrun `model` is
    laid out in place over `dims` (default: from cfg.train) unless it is already
    (hf_io.load_model(shard=...); engine/parallel/layout.py). With `lora`
    (engine/train/adapters.py) the adapters train and are checkpointed, `model`'s own weights stay
    frozen (sharded like any frozen model; the adapters and heads whole on every rank, their
    gradients averaged)."""
    check_context(cfg.data, model.config.max_model_len)
    dims = dims or ParallelDims.from_train(cfg.train, distributed.world_size(), device.type)
    # This rank's micro-batches: a tensor group's (and a context group's) ranks take the same ones.
    share = distributed.rank_slice(cfg.optim.grad_accum_steps,
                                   distributed.DataRanks(same_rows(cfg.train)))
    # Each rank keeps (and steps) its shards: FSDP2's, its tensor slices or its data shard of them.
    heads = list(lora.heads.values()) if lora is not None else []
    layout(model, "trained" if lora is None else "adapted", dims, heads)
    model.train()
    model.set_recompute(cfg.train.checkpointing(), cfg.train.activation_offload)
    steps = total_steps(train_ex, cfg)
    captured = captured_forwards(model, stage, cfg, device, lora)
    optimizer = optim.build_optimizer(model if lora is None else lora, cfg.optim)
    scheduler = optim.build_scheduler(optimizer, cfg.optim, steps)
    saved = ({"model": SavedModel(model, stage.load_weights)} if lora is None
             else {"adapter": adapters.saved_adapter(lora)})
    parts = Trainables(saved, [optimizer], [scheduler])
    state = SupervisedState()
    stream = None  # opened at the first step, from the (possibly resumed) position

    def step(state: SupervisedState) -> dict:
        nonlocal stream
        stream = stream or micro_batches(train_ex, cfg.data.tokens_per_batch, cfg.seed, state)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        group = [next(stream) for _ in range(micro_batches_per_step(cfg))]
        batches = step_forwards(stage, [examples for _, _, examples in group[share]],
                                cfg.data.tokens_per_microbatch)
        rank_sizes = distributed.all_gather((sum(len(b.input_ids) for b in batches), len(batches)))
        rank_tokens, rank_forwards = (list(column) for column in zip(*rank_sizes))
        metrics = train_step(model, stage, batches, optimizer, scheduler, cfg, device,
                             max(rank_forwards), captured)
        state.epoch, state.batch_index = group[-1][0], group[-1][1] + 1
        # a tensor (context) group's ranks ran the same tokens
        tokens = sum(rank_tokens[::same_rows(cfg.train)])
        state.tokens += tokens
        return {**metrics, "tokens": tokens, "tokens_per_rank": rank_tokens,
                "forwards_per_rank": rank_forwards, "epoch": state.epoch,
                "peak_mem_mb": peak_memory_mb(device)}

    evaluate_held_out = (lambda: evaluate(model, stage, eval_ex, cfg, device)) if eval_ex else None
    plan = RunPlan(cfg.output_dir, cfg, cfg.train, steps, cfg.train.eval_every,
                   held_out_notice(cfg.data, len(train_ex), len(eval_ex)), callbacks)
    return run_training(plan, parts, state, step, evaluate=evaluate_held_out, info=log_info,
                        device=device)
