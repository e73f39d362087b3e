"""The reward of a rollout's rows: a reward model at each sequence's last token (reading the
rollout's one pack), or a Python function of the decoded texts."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ...data.packing import PackedBatch, pack_sequences
from ..rewards.functions import call_reward_fn
from .chunks import forward_in_pieces

# (prompts, responses) token ids -> scores [R]. A scorer that can read the rollout's pack instead
# (a reward model) also has `score_packed(packed) -> [R]`.
Scorer = Callable[[list[list[int]], list[list[int]]], torch.Tensor]


class RewardModelScorer:
    """Scores from a reward model (its normalization offset applied) at each sequence's last token.
    critic_lora: the LoRA critic's adapters when they hook the reward model's own projections (the
    critic shares its trunk): switched off while it scores."""

    def __init__(self, rm, critic_lora=None):
        self.rm, self.critic_lora = rm, critic_lora

    def score_packed(self, packed: PackedBatch) -> torch.Tensor:
        """Scores [S] of an already packed batch (the rollout's own pack: no second packing)."""
        off = self.critic_lora.disabled() if self.critic_lora is not None else contextlib.nullcontext()
        with off:
            return self.rm.rewards(packed.input_ids, packed.seqlens, packed.positions, packed.cu_seqlens)

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        packed = pack_sequences([(p, r, False) for p, r in zip(prompts, responses)],
                                device=next(self.rm.parameters()).device)
        return self.score_packed(packed)


def reward_model_scorer(rm, critic_lora=None) -> RewardModelScorer:
    return RewardModelScorer(rm, critic_lora)


def score_rows(score: Scorer, prompts: list[list[int]], responses: list[list[int]],
               packed: PackedBatch, tokens_per_forward: int | None = None) -> torch.Tensor:
    """Scores [R] of the rollout's rows, from its pack when the scorer reads one (in forwards of at
    most `tokens_per_forward` tokens: chunks.py)."""
    score_packed = getattr(score, "score_packed", None)
    if score_packed is None:
        return score(prompts, responses)
    return forward_in_pieces(packed, tokens_per_forward, score_packed)


def function_scorer(fn: Callable, tokenizer, name: str, timeout_s: float, tensor_parallel=None) -> Scorer:
    """Scores from a Python function of the decoded texts: fn(prompts, responses) -> list of floats,
    contained (engine/stages/reward_fn.py). `name` (e.g. reward_fn's 'module:function') names it in
    errors; `timeout_s` bounds one call. tensor_parallel (the policy's engine/tensor_parallel
    TensorParallel, whose ranks hold the same rows): only its first rank calls fn, and every rank
    takes its scores, so the group agrees even with a reward function that is not deterministic."""
    def call(prompts, responses):
        return call_reward_fn(fn, name, [tokenizer.decode(p, skip_special_tokens=True) for p in prompts],
                              [tokenizer.decode(r, skip_special_tokens=True) for r in responses], timeout_s)

    def score(prompts, responses):
        if tensor_parallel is None:
            values = call(prompts, responses)
        else:
            values = tensor_parallel.same_on_ranks(call(prompts, responses) if tensor_parallel.rank == 0 else None)
        return torch.tensor(values, dtype=torch.float32)
    return score
