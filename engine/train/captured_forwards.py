"""A supervised stage's training forwards (SFT's, the reward model's) replayed from CUDA graphs
(`train.cuda_graphs=true`): each forward's forward, loss and backward one CapturedMicroBatch
replay (captured_micro_batch.py), in buckets that share the model's flat gradients and one graph
memory pool.

Why: a micro-batch called op by op is host-bound on a GPU at small and middling sizes. On the H200
of 2026-11-28 a 1k-token micro-batch at the Qwen2.5-0.5B shape took 101.7 ms called, and 21.4 ms
replayed from a graph, its device busy 12.8 ms (bench/results/2026-11-28-h200). The stages' own
steps were still called op by op.

A stage says what its graph computes with a `CapturedLoss`: its per-token columns and their filler
values, the loss on the padded pack's hidden states, the columns of one batch, and the stats
(supervised.Stage's) from the loss and the loss function's other outputs. The loss is weighted per
row by the step's counts (SFT: each target by 1 / the step's response tokens; the reward model:
each ranked pair, written one a row, by 1 / C(K, 2) / the step's rankings), so a replay's loss is
the eager loss of that forward and the gradients add up as the eager backwards' do. A pack whose
columns do not fit its rows (a ranking of many one-token responses) runs the stage's eager loss.

Buckets: every forward of a run holds at most `tokens` tokens (its token budget:
data.tokens_per_microbatch, else data.tokens_per_batch); the number of sequences varies, and a
bucket's filler sequences grow with its bound. A forward takes the bucket whose bound is the least
power of two (at least MIN_SEQUENCES) holding its sequences, captured at its first use: a few
graphs a run, each replayed for every forward of its size class. They share one flat gradient
buffer (the gradients are the model's, not a bucket's), one memory pool (their replays never
overlap, and each loss is copied out before the next replay) and one capture stream (the
allocator reuses a pool's freed blocks on the stream that freed them only: a stream per capture
would keep each bucket's activations apart).

Where it runs: one process on CUDA (a graph replays no collective of FSDP's), a dense text model
(an MoE layer reads its routing on the host; images enter through a tower outside the pack), no
gradient checkpointing (torch.utils.checkpoint keeps RNG state, which a capture refuses) and no
LoRA adapters (not shown in a graph yet), and a varlen attention kernel (captured_micro_batch.py).
`blocker` says which of these a run misses, in one line. On the CPU the same buckets run eagerly
on the same padded buffers (CapturedMicroBatch without CUDA), which is what the CPU tests check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..model.moe import moe_blocks
from ..parallel import distributed
from .captured_micro_batch import (CapturedMicroBatch, Column, LossFn,
                                   packed_attention_problem)
from .flat_grads import FlatGradients

# The least sequence bound of a bucket: packs of a few sequences share one graph.
MIN_SEQUENCES = 8


@dataclass(frozen=True)
class CapturedLoss:
    """What a stage's graph computes.

    columns: name -> Column of every per-token input of the loss. make_loss(model) -> LossFn on
    hidden [rows, H] and the columns [rows] (filler rows hold each column's pad and must weigh
    nothing). values(batch, step_counts) -> name -> [N] tensor on the batch's device, the columns
    of one pack of N tokens. stats(loss, outputs, batch, step_counts) -> the stats
    supervised.Stage.loss would return beside that loss (0-dim tensors; outputs: the loss
    function's other outputs, if any). fits(batch) -> whether a pack's columns can be written
    (default: always); one that cannot runs the stage's eager loss. unreached(model) -> the trained
    parameters the loss never reaches (default: none), whose `.grad` stays None as in an eager
    step."""
    columns: Mapping[str, Column]
    make_loss: Callable[[torch.nn.Module], LossFn]
    values: Callable
    stats: Callable
    fits: Callable = lambda batch: True
    unreached: Callable = lambda model: ()


def bucket_sequences(sequences: int, tokens: int) -> int:
    """The sequence bound of the bucket a pack of `sequences` sequences takes: the least power of
    two >= it, at least MIN_SEQUENCES, at most `tokens` (a sequence holds a token or more)."""
    bound = max(MIN_SEQUENCES, 1 << max(sequences - 1, 0).bit_length())
    return min(bound, tokens)


def blocker(model, device: torch.device, captured: CapturedLoss | None, checkpointing: bool,
            lora) -> str | None:
    """Why this run's forwards cannot be replayed from CUDA graphs (a clause), or None."""
    if device.type != "cuda":
        return f"it needs CUDA (the run's device is {device})"
    if captured is None:
        return "this stage's loss has no captured form yet"
    if distributed.world_size() > 1:
        return (f"it runs in one process (this one is 1 of {distributed.world_size()}): a graph "
                "replays none of the ranks' collectives")
    if checkpointing:
        return ("train.gradient_checkpointing recomputes layers under torch.utils.checkpoint, "
                "which a capture refuses")
    if lora is not None:
        return "LoRA adapters are not shown in a graph yet"
    if moe_blocks(model):
        return "an MoE layer reads its routing on the host"
    if getattr(model.config, "vision", None) is not None:
        return "a vision-language model's images enter outside the pack"
    return packed_attention_problem(model)


class CapturedForwards:
    """A stage's training forwards, each one graph replay (the forward, its loss and backward).

    model: a CausalLM on CUDA (on the CPU: the same padded steps, run eagerly). captured: the
    stage's CapturedLoss. tokens: the run's token budget of one forward (>= 1)."""

    def __init__(self, model, captured: CapturedLoss, tokens: int):
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise ValueError(f"CapturedForwards: tokens={tokens!r}, expected an int >= 1")
        self.model, self.captured, self.tokens = model, captured, tokens
        self.loss = captured.make_loss(model)
        self.buckets: dict[int, CapturedMicroBatch] = {}
        self.grads: FlatGradients | None = None  # the first bucket's, shared with the others
        device = model.model.embed_tokens.weight.device
        self.skip = tuple(captured.unreached(model))
        # One pool and one capture stream for every bucket: the allocator hands a pool's freed
        # blocks to the stream that freed them only.
        graphs = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.stream = torch.cuda.Stream(device) if graphs else None

    def fits(self, batch) -> bool:
        """Whether `batch` (a PackedBatch) can take a graph: within the token budget, and its
        columns writable (CapturedLoss.fits); else the stage's eager loss runs it."""
        return len(batch.input_ids) <= self.tokens and self.captured.fits(batch)

    def run(self, batch, step_counts: dict):
        """One forward of `batch` (a PackedBatch on the model's device, fitting) with its
        backward: (its loss, a 0-dim tensor of its own; the stage's stats). The gradients are added
        to param.grad, as backward() of the stage's eager loss adds them."""
        bound = bucket_sequences(len(batch.seqlens), self.tokens)
        bucket = self.buckets.get(bound)
        if bucket is None:
            bucket = CapturedMicroBatch(self.model, self.loss, self.captured.columns, self.tokens,
                                        bound, grads=self.grads, pool=self.pool,
                                        stream=self.stream, skip=self.skip)
            self.buckets[bound] = bucket
        # the graph's own tensor: the next replay overwrites it
        loss = bucket.run(batch.input_ids, batch.seqlens,
                          self.captured.values(batch, step_counts)).clone()
        outputs = {name: value.clone() for name, value in bucket.outputs.items()}
        self.grads = bucket.grads
        return loss, self.captured.stats(loss, outputs, batch, step_counts)
