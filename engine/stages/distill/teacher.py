"""The frozen teacher of on-policy distillation: loaded and laid out as the reference model is
(engine/parallel/layout.py's "frozen" role: FSDP2 shards, tensor-parallel slices,
train.frozen_offload), and run once per batch over the rollout's one pack. It hands on its hidden
state at each sampled position, not its logits: the fused divergence applies its head."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...config.distill import check_teacher_vocabulary
from ...data.packing import PackedBatch
from ...errors import UsageError
from ...model.causal_lm import CausalLM
from ...model.hf_io import load_config, load_model, load_tokenizer
from ...model.lm_head import head_dtype, lm_head_logprobs
from ...parallel import distributed
from ...parallel.dims import ParallelDims
from ...parallel.layout import layout_at_load
from ..rollout.microbatches import forward_in_microbatches


# The files of a tokenizer transformers loads from a model directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def refuse_other_vocabulary(student_dir: str, teacher_dir: str, top_k: int | None = None) -> None:
    """UsageError in one line unless the teacher's vocabulary is the student's: the same
    vocab_size (config.json) and, where the teacher's directory holds a tokenizer, every token at
    the same id (a chat template of its own is no difference); with `top_k` (distill.mode=top_k),
    unless it is below the vocabulary's size."""
    vocab = load_config(Path(student_dir)).vocab_size
    try:
        check_teacher_vocabulary(vocab, load_config(Path(teacher_dir)).vocab_size, teacher_dir)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if top_k is not None and top_k >= vocab:
        raise UsageError(f"distill.top_k={top_k} must be below the vocabulary's {vocab} tokens")
    if not any((Path(teacher_dir) / name).exists() for name in TOKENIZER_FILES):
        return
    ours, theirs = (load_tokenizer(d).get_vocab() for d in (student_dir, teacher_dir))
    moved = sorted(t for t in ours.keys() | theirs.keys() if ours.get(t) != theirs.get(t))
    if moved:
        raise UsageError(f"teacher={teacher_dir}: its tokenizer gives {len(moved)} token(s) "
                         f"another id than the student's (policy), e.g. {moved[0]!r}: "
                         f"{theirs.get(moved[0])} against {ours.get(moved[0])}; distillation needs "
                         "one vocabulary")


@dataclass
class Teacher:
    """The frozen teacher and its LM head's whole weight [V, Ht] (gathered once: the teacher never
    changes, and the divergence reads the head outside the teacher's forward, where FSDP2 holds
    only shards)."""
    model: CausalLM
    head: torch.Tensor


def load_teacher(teacher_dir: str, dtype: torch.dtype, device, dims: ParallelDims) -> Teacher:
    """The teacher read from `teacher_dir` in `dtype`, laid out over `dims` as the reference model
    is, frozen (eval mode, no gradients)."""
    model = load_model(teacher_dir, dtype=dtype, device=device,
                       shard=layout_at_load("frozen", dims)).eval().requires_grad_(False)
    with torch.no_grad():
        head = distributed.whole_value(model.lm_head.weight.detach())
    return Teacher(model, head)


@dataclass
class TeacherScores:
    """The teacher's reading of a pack's M targets (row after row, the pack's target order):
    hidden [M, Ht] at each target's predicting position (None with top_k), logprobs [M] fp32 of
    the sampled tokens at the divergence's temperature (a metric, and the sampled mode's signal),
    and with distill.mode=top_k its K likeliest tokens at each position, topk_ids [M, K] int64
    and topk_logprobs [M, K] fp32."""
    hidden: torch.Tensor | None
    logprobs: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None

    def take(self, index: torch.Tensor) -> "TeacherScores":
        """The scores of targets `index` [M'] (in that order)."""
        return TeacherScores(*(None if x is None else x.index_select(0, index)
                               for x in (self.hidden, self.logprobs, self.topk_ids,
                                         self.topk_logprobs)))


# Rows of teacher logits [rows, V] fp32 held at once by teacher_top_k: 64 MiB at V = 16k.
TOP_K_ROWS = 1024


def teacher_top_k(hidden: torch.Tensor, head: torch.Tensor, k: int,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [M, Ht], head [V, Ht] -> (ids [M, K] int64, log-probs [M, K] fp32) of the teacher's
    K likeliest tokens under softmax(logits / temperature), TOP_K_ROWS rows of logits at a time
    (never [M, V])."""
    if k >= head.shape[0]:
        raise ValueError(f"distill.top_k={k} must be below the vocabulary's {head.shape[0]} tokens")
    ids, logprobs = [], []
    dtype = head_dtype(hidden, head)
    with torch.autocast(hidden.device.type, enabled=False):
        for rows in hidden.split(TOP_K_ROWS):
            logp = ((rows.to(dtype) @ head.to(dtype).T).float() / temperature).log_softmax(-1)
            top = logp.topk(k, dim=-1)
            ids.append(top.indices)
            logprobs.append(top.values)
    if not ids:
        return (torch.empty(0, k, dtype=torch.long, device=hidden.device),
                torch.empty(0, k, device=hidden.device))
    return torch.cat(ids), torch.cat(logprobs)


def score_with_teacher(teacher: Teacher, packed: PackedBatch, temperature: float,
                       tokens_per_forward: int | None, top_k: int | None = None,
                       ranks: distributed.DataRanks = distributed.WORLD) -> TeacherScores:
    """One forward of the frozen teacher over `packed` (cut by `tokens_per_forward` tokens, as
    every scoring forward is: ppo/microbatches.py), without gradients; with `top_k` its top-K
    tokens instead of its hidden states (distill.mode=top_k)."""
    def forward(micro: PackedBatch):
        hidden, target_rows, _ = teacher.model.forward_rows(micro)             # [N', Ht]
        h = hidden.index_select(0, target_rows)                                # [M_i, Ht]
        logp = lm_head_logprobs(h, teacher.head, micro.target_ids, temperature=temperature)
        if top_k is None:
            return h, logp, None, None
        return (None, logp, *teacher_top_k(h, teacher.head, top_k, temperature))
    with torch.no_grad():
        return TeacherScores(*forward_in_microbatches(packed, tokens_per_forward, forward, ranks))


def target_index(packed: PackedBatch, rows: list[int]) -> torch.Tensor:
    """[M'] the positions in `packed`'s target order of the targets of sequences `rows` (in that
    order): how a micro-batch `packed.select(rows)` finds its rows of a TeacherScores."""
    starts = [0]
    for count in packed.target_counts[:-1]:
        starts.append(starts[-1] + count)
    index = [t for r in rows for t in range(starts[r], starts[r] + packed.target_counts[r])]
    return torch.tensor(index, dtype=torch.long, device=packed.target_ids.device)
