"""The frozen teacher of on-policy distillation: loaded and laid out as the reference model is
(engine/parallel/layout.py's "frozen" role: FSDP2 shards, tensor-parallel slices,
train.frozen_offload), and run once per batch over the rollout's one pack. It hands on its hidden
state at each sampled position, not its logits: the fused divergence applies its head."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ...data.device_tensors import device_tensor
from ...config.distill import check_teacher_vocabulary
from ...data.packing import PackedBatch
from ...errors import UsageError
from ...model.causal_lm import CausalLM
from ...model.hf_io import load_config, load_model, load_tokenizer
from ...model.lm_head import head_dtype, lm_head_logprobs, sampler_bias
from ...parallel import distributed
from ...parallel.dims import ParallelDims
from ...parallel.layout import layout_at_load
from ..rollout.microbatches import forward_in_microbatches


# The files of a tokenizer transformers loads from a model directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# A vision-language model's image processor, beside its tokenizer.
PREPROCESSOR = "preprocessor_config.json"


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


def refuse_other_images(student_dir: str, teacher_dir: str) -> None:
    """UsageError in one line unless the teacher reads images as the student does: both text
    models, or both vision-language models with the same vision token ids and the same image
    processor (preprocessor_config.json: the pixels of a rollout's pack are the student's
    processor's, and the teacher's forward takes them as they are)."""
    specs = [load_config(Path(d)).vision for d in (student_dir, teacher_dir)]
    if (specs[0] is None) != (specs[1] is None):
        kinds = ["a vision-language model" if v is not None else "a text model" for v in specs]
        raise UsageError(f"teacher={teacher_dir} is {kinds[1]} but the student (policy) is "
                         f"{kinds[0]}: distillation needs both to read the same inputs")
    if specs[0] is None:
        return
    if specs[0].vision_token_ids != specs[1].vision_token_ids:
        raise UsageError(f"teacher={teacher_dir}: its vision token ids "
                         f"{list(specs[1].vision_token_ids)} are not the student's "
                         f"{list(specs[0].vision_token_ids)}; distillation needs one vocabulary")
    processors = [_image_processor(d) for d in (student_dir, teacher_dir)]
    differ = sorted(k for k in processors[0].keys() | processors[1].keys()
                    if processors[0].get(k) != processors[1].get(k))
    if differ:
        raise UsageError(f"teacher={teacher_dir}: its image processor differs from the "
                         f"student's in {differ[0]!r} ({processors[1].get(differ[0])!r} against "
                         f"{processors[0].get(differ[0])!r}); the teacher reads the student's "
                         "processed pixels, so both need one image processor")


def _image_processor(model_dir: str) -> dict:
    """A vision-language model directory's preprocessor_config.json, read; UsageError without."""
    path = Path(model_dir) / PREPROCESSOR
    if not path.is_file():
        raise UsageError(f"{model_dir}: a vision-language model without {PREPROCESSOR} (its image "
                         "processor); distillation compares the student's and the teacher's")
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class Teacher:
    """The frozen teacher, its LM head's whole weight [V, Ht] (gathered once: the teacher never
    changes, and the divergence reads the head outside the teacher's forward, where FSDP2 holds
    only shards) and its logit bias [V] (lm_head.sampler_bias: a vision-language teacher's -inf at
    the vision ids, which the student's sampler never draws; None for text)."""
    model: CausalLM
    head: torch.Tensor
    bias: torch.Tensor | None = None


def load_teacher(teacher_dir: str, dtype: torch.dtype, device, dims: ParallelDims) -> Teacher:
    """The teacher read from `teacher_dir` in `dtype`, laid out over `dims` as the reference model
    is, frozen (eval mode, no gradients)."""
    model = load_model(teacher_dir, dtype=dtype, device=device,
                       shard=layout_at_load("frozen", dims)).eval().requires_grad_(False)
    with torch.no_grad():
        head = distributed.whole_value(model.lm_head.weight.detach())
    return Teacher(model, head, sampler_bias(model, head.device))


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


def teacher_top_k(hidden: torch.Tensor, head: torch.Tensor, k: int, temperature: float,
                  bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [M, Ht], head [V, Ht] -> (ids [M, K] int64, log-probs [M, K] fp32) of the teacher's
    K likeliest tokens under softmax((logits + bias) / temperature) (bias [V] fp32 or None),
    TOP_K_ROWS rows of logits at a time (never [M, V])."""
    if k >= head.shape[0]:
        raise ValueError(f"distill.top_k={k} must be below the vocabulary's {head.shape[0]} tokens")
    ids, logprobs = [], []
    dtype = head_dtype(hidden, head)
    with torch.autocast(hidden.device.type, enabled=False):
        for rows in hidden.split(TOP_K_ROWS):
            logits = (rows.to(dtype) @ head.to(dtype).T).float()
            if bias is not None:
                logits = logits + bias
            logp = (logits / temperature).log_softmax(-1)
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
        logp = lm_head_logprobs(h, teacher.head, micro.target_ids, temperature=temperature,
                                bias=teacher.bias)
        if top_k is None:
            return h, logp, None, None
        return (None, logp, *teacher_top_k(h, teacher.head, top_k, temperature, teacher.bias))
    with torch.no_grad():
        return TeacherScores(*forward_in_microbatches(packed, tokens_per_forward, forward, ranks))


def target_index(packed: PackedBatch, rows: list[int]) -> torch.Tensor:
    """[M'] the positions in `packed`'s target order of the targets of sequences `rows` (in that
    order): how a micro-batch `packed.select(rows)` finds its rows of a TeacherScores."""
    starts = [0]
    for count in packed.target_counts[:-1]:
        starts.append(starts[-1] + count)
    index = [t for r in rows for t in range(starts[r], starts[r] + packed.target_counts[r])]
    return device_tensor(index, torch.long, packed.target_ids.device)
