"""One training micro-batch's forward, loss and backward captured once as a CUDA graph, then
replayed for every micro-batch that fits its bucket.

Why: the H100 profile of a 1k-token micro-batch at the Qwen2.5-0.5B shape found it host-bound: about
2,800 launches a step, the device busy 14% of the wall. A graph replays every kernel of the forward
and the backward from one host call, so the step costs what its kernels cost on the device.

A graph replays fixed sizes at fixed addresses, so a micro-batch of at most `tokens` tokens in at
most `sequences` sequences is packed into a bucket of `rows` (`tokens + sequences` rounded up to a
multiple of 16) in `sequences + 1` sequences: the real sequences first, then filler sequences of at
least one row each (token 0, position 0) that take the rest of the rows, so any pack that fits has
room for them. The extra rows are the cost (16 at 1,024 tokens in 4 sequences: 1.6%); the multiple
of 16 keeps the row count's divisibility, which Triton specializes its kernels on, as a training
pack's usually is, so the replayed kernels are the ones the eager steps compiled. No sequence is
empty: a zero-length sequence is an edge case varlen kernels have got wrong. Filler rows attend
only within their own sequence and every op outside attention is per row, so they change no real
row; the loss must give them no weight (each column's `pad` value, e.g. a weight of 0), so they add
nothing to any gradient.

The attention's varlen kernel reads the sequences' boundaries from the device (`cu_seqlens`,
rewritten before each replay) and takes the longest sequence only as a bound on its grid: the graph
is captured with the bucket's longest possible sequence (`rows - sequences`). That needs a
varlen kernel (flash-attn's or torch's): the padded SDPA path plans on the host from the lengths, so
a graph of it would replay the capture's plan; on such a machine capture is refused.

Gradients accumulate into `param.grad` as an eager backward's do (a parameter no backward reaches
holds zeros, not None, as in a graph). At its first run the object puts every trained parameter's
gradient in flat buffers (flat_grads.py: views of one buffer per dtype, holding the values `.grad`
had, zeros where it had none); the graph adds into those views, so before each run they go back
where the parameters' `.grad` moved since: zeroed where it was set to None (`zero_grad()`'s
default: one fill of the buffer), holding the values of a tensor that replaced it. The sum is then
an eager backward's. `zero_grad()` here zeroes them all in one fill per buffer (what the H200
profile asked for: a foreach zero of 290 gradient tensors took about 6 ms of host a step). The
trained parameters are the first run's: a later run refuses a model whose requires_grad changed.
The graph's activations live in its own memory pool while the object lives (one micro-batch's
peak, as an eager step's).

Without CUDA there is no graph: `run` runs the same step eagerly on the same padded buffers and
flat gradients, which is what the CPU tests check (filler rows leave the loss and gradients
unchanged).
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import numpy as np
import torch

from ...kernels.attention import AttentionMetadata, attention_backend
from ..data.device_tensors import copy_from_host, host_cu_seqlens, host_positions
from .flat_grads import FlatGradients

# What a captured micro-batch's loss gets: hidden [rows, H] of the padded pack, and the columns
# [rows] by name (the pack's rows' values, then each column's pad value) -> a scalar loss, or
# (the loss, outputs: name -> a tensor the step also computes, e.g. a count for the stats).
LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]

# A bucket's rows are a multiple of this (Triton specializes integer arguments on divisibility).
ROW_MULTIPLE = 16
# Attention kernels whose graph replays any boundaries under the captured bound
# (attention_backend's names).
VARLEN_KERNELS = ("flash_attn", "torch_varlen")


class Column(NamedTuple):
    """A per-token input of the loss: its dtype and the value its filler rows get."""
    dtype: torch.dtype
    pad: float


class CapturedMicroBatch:
    """A training micro-batch of at most `tokens` tokens in at most `sequences` sequences, padded to
    `rows` rows (tokens + sequences, rounded up to a multiple of 16) with filler sequences, run as
    one CUDA graph on a CUDA model.

    model: a CausalLM (not tensor- or context-parallel). loss: LossFn. columns: name -> Column of
    every per-token input the loss reads. warmup: eager steps before the capture (lazy inits,
    Triton compiles and autotuning happen there, not in the graph). grads: FlatGradients of the
    model's trained parameters to add into, shared with other buckets of the same model (default:
    its own, made at the first run). pool: a graph memory pool (torch.cuda.graph_pool_handle())
    shared with other buckets whose runs never overlap (default: its own), and stream: the CUDA
    stream their captures share (the allocator reuses a pool's freed blocks for the stream that
    freed them only; default: one of its own). skip: trained parameters the loss never reaches,
    left out of the gradient buffers so that their `.grad` stays None, as an eager backward leaves
    it (an optimizer then leaves them alone).
    """

    def __init__(self, model, loss: LossFn, columns: Mapping[str, Column], tokens: int,
                 sequences: int, warmup: int = 2, grads: FlatGradients | None = None,
                 pool=None, stream=None, skip: tuple = ()):
        for name, value in (("tokens", tokens), ("sequences", sequences), ("warmup", warmup)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CapturedMicroBatch: {name}={value!r}, expected an int >= 1")
        if sequences > tokens:
            raise ValueError(f"CapturedMicroBatch: sequences={sequences} exceeds tokens={tokens}: "
                             "each sequence holds at least one token")
        for name in ("tensor_parallel", "context_parallel"):
            if getattr(model, name, None) is not None:
                raise ValueError(f"CapturedMicroBatch: the model is {name.replace('_', '-')}: "
                                 "its forward exchanges with other ranks, expected a whole model")
        weight = model.model.embed_tokens.weight
        self.model, self.loss, self.device = model, loss, weight.device
        self.tokens, self.sequences, self.warmup = tokens, sequences, warmup
        self.rows = -(-(tokens + sequences) // ROW_MULTIPLE) * ROW_MULTIPLE
        self.columns = dict(columns)
        self.graphs = self.device.type == "cuda"
        if self.graphs and (problem := packed_attention_problem(model)) is not None:
            raise ValueError(f"CapturedMicroBatch: {problem}")
        self._ids = torch.zeros(self.rows, dtype=torch.int64, device=self.device)
        self._positions = torch.zeros(self.rows, dtype=torch.int64, device=self.device)
        self._cu_seqlens = torch.zeros(sequences + 2, dtype=torch.int32, device=self.device)
        self._values = {name: torch.full((self.rows,), c.pad, dtype=c.dtype, device=self.device)
                        for name, c in self.columns.items()}
        # The capture's lengths: the bucket's longest possible sequence (the rows less one for each
        # other sequence), so that the attention's grid covers any pack.
        self._meta = AttentionMetadata.packed([self.rows - sequences] + [1] * sequences,
                                              self.device, self._cu_seqlens)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.pool, self.stream, self.skip = pool, stream, tuple(skip)
        # made at the first run unless shared (the graph adds into them)
        self.grads: FlatGradients | None = grads
        self._loss: torch.Tensor | None = None
        # the loss function's other outputs of the last run (the graph's own tensors on CUDA)
        self.outputs: dict[str, torch.Tensor] = {}

    def fits(self, tokens: int, sequences: int) -> bool:
        """Whether a pack of `tokens` tokens in `sequences` sequences fits the bucket."""
        return 1 <= sequences <= self.sequences and sequences <= tokens <= self.tokens

    def run(self, input_ids: torch.Tensor, seqlens: list[int],
            columns: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One micro-batch: input_ids [N] of packed sequences of `seqlens` on the model's device,
        columns name -> [N] (every column of the constructor's, each of its dtype) -> the loss []
        (the graph's own tensor on CUDA: overwritten by the next run; clone to keep it). The loss
        function sees hidden [rows, H] and columns [rows]: the pack's N rows, then the filler's.
        The gradients are added to param.grad (whatever zero_grad did to it since the last run);
        the loss function's other outputs, detached, are in `self.outputs` (the graph's own too)."""
        self._check(input_ids, seqlens, columns)
        self._fill(input_ids, seqlens, columns)
        if not self.graphs:
            if self.grads is None:
                self.grads = FlatGradients(self._trained())
            else:
                self._check_trained()
                self.grads.reattach()
            self._loss, self.outputs = self._step()
            return self._loss
        # Under the model's device: a capture records the current device's streams only, and a
        # replay launches on the current device.
        with torch.cuda.device(self.device):
            if self.graph is None:
                self.graph = self._capture()
            else:
                self._check_trained()
                self.grads.reattach()
            self.graph.replay()
        return self._loss

    def zero_grad(self) -> None:
        """Every trained parameter's gradient zeroed, in place in the flat buffers the runs add
        into: one fill per buffer (the model's zero_grad() leaves the same fill to the next run)."""
        if self.grads is None:
            self.grads = FlatGradients(self._trained())
        self._check_trained()
        self.grads.zero_()

    def _trained(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters()
                if p.requires_grad and not any(p is q for q in self.skip)]

    def _check_trained(self) -> None:
        """The trained parameters must be those of the first run (the graph's, the buffers')."""
        trained = self._trained()
        if len(trained) != len(self.grads.params) or any(
                p is not q for p, q in zip(trained, self.grads.params)):
            raise ValueError(
                f"CapturedMicroBatch: the model trains {len(trained)} parameters, its first run "
                f"{len(self.grads.params)} (requires_grad changed): a graph and its gradient "
                "buffers hold the first run's; make a new CapturedMicroBatch")

    def _check(self, input_ids, seqlens, columns):
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids is {tuple(input_ids.shape)}: expected [N]")
        self.model.check_pack(input_ids, seqlens)
        n = input_ids.shape[0]
        if not self.fits(n, len(seqlens)):
            raise ValueError(
                f"a pack of {n} tokens in {len(seqlens)} sequences does not fit the bucket of at "
                f"most {self.tokens} tokens in {self.sequences} sequences")
        if set(columns) != set(self.columns):
            raise ValueError(f"columns {sorted(columns)}: expected {sorted(self.columns)}")
        for name, value in columns.items():
            dtype = self.columns[name].dtype
            if value.shape != (n,) or value.dtype != dtype or value.device != self.device:
                raise ValueError(
                    f"columns[{name!r}] is {value.dtype} {tuple(value.shape)} on {value.device}: "
                    f"expected {dtype} ({n},) on {self.device}")

    def _fill(self, input_ids, seqlens, columns):
        """The pack and its filler rows into the static buffers (device copies, and one host copy
        each of the positions and the boundaries)."""
        n = input_ids.shape[0]
        padded = seqlens + filler_lengths(self.rows - n, self.sequences + 1 - len(seqlens))
        self._ids[:n].copy_(input_ids)
        self._ids[n:].zero_()
        for name, value in columns.items():
            self._values[name][:n].copy_(value)
            self._values[name][n:].fill_(self.columns[name].pad)
        positions = np.zeros(self.rows, dtype=np.int64)  # filler rows: position 0
        positions[:n] = host_positions(seqlens)
        copy_from_host(self._positions, positions)
        copy_from_host(self._cu_seqlens, host_cu_seqlens(padded))
        if not self.graphs:  # eager: the attention may plan on the host from the true lengths
            self._meta = AttentionMetadata.packed(padded, self.device, self._cu_seqlens)

    def _step(self) -> tuple[torch.Tensor, dict]:
        hidden = self.model.entry()(self._ids, self._positions, self._meta)
        loss = self.loss(hidden, self._values)
        loss, outputs = loss if isinstance(loss, tuple) else (loss, {})
        loss.backward()
        return loss.detach(), {name: value.detach() for name, value in outputs.items()}

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (as torch's whole-network capture does), then capture one step
        and replay it for the pack now in the buffers (a capture runs nothing). The warm-up's
        gradients are thrown away: the parameters' own gradients are set aside and restored, into
        the flat buffers the graph adds into (or zeroed there, after zero_grad())."""
        params = self._trained()
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._step()
        current.wait_stream(side)
        for p, grad in zip(params, kept):
            p.grad = grad
        if self.grads is None:
            self.grads = FlatGradients(params)
        else:
            self._check_trained()
            self.grads.reattach()
        graph = torch.cuda.CUDAGraph()
        self.stream = self.stream or torch.cuda.Stream(self.device)
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            self._loss, self.outputs = self._step()
        return graph


def packed_attention_problem(model) -> str | None:
    """Why a graph of `model`'s packed forward (on its device, dtype and head size) would replay
    the capture's sequence boundaries (a clause), or None where its attention kernel reads them from
    the device."""
    config, weight = model.config, model.model.embed_tokens.weight
    kernel = attention_backend(torch.empty(1, config.num_heads, config.head_dim,
                                           device=weight.device, dtype=weight.dtype))
    if kernel in VARLEN_KERNELS:
        return None
    return (f"packed attention runs {kernel!r} on {weight.device} for {weight.dtype} at head size "
            f"{config.head_dim}; a graph needs a varlen kernel ({', '.join(VARLEN_KERNELS)}), "
            "which reads the boundaries from the device")


def filler_lengths(rows: int, sequences: int) -> list[int]:
    """`rows` filler rows (>= sequences >= 1) as `sequences` sequences of at least one row each,
    as even as can be (attention's work grows with the square of a sequence)."""
    base, extra = divmod(rows, sequences)
    return [base + 1] * extra + [base] * (sequences - extra)
