"""Scoring a packed rollout: the reward (a reward model at each sequence's last token, or a Python
function of the texts) and the token-level forwards (log-probs, entropies, values) of the policy,
the reference and the critic. Every forward reads the rollout's one pack (its ids, positions and
sequence boundaries)."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Optional

import torch

from ...data.packing import PackedBatch, pack_sequences
from ...errors import FusedRLError
from ...model.invariant import BatchInvariant
from ...model.lm_head import lm_head_logprobs
from ... import distributed

if TYPE_CHECKING:
    from .models import PPOModels

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
               packed: PackedBatch) -> torch.Tensor:
    """Scores [R] of the rollout's rows, from its pack when the scorer reads one."""
    score_packed = getattr(score, "score_packed", None)
    return score_packed(packed) if score_packed is not None else score(prompts, responses)


class RewardFunctionError(FusedRLError):
    """The reward function raised, or returned something other than one number per response."""


def function_scorer(fn: Callable, tokenizer, name: str) -> Scorer:
    """Scores from a Python function of the decoded texts: fn(prompts, responses) -> list of floats.
    `name` (e.g. reward_fn's 'module:function') names it in errors."""
    def score(prompts, responses):
        try:
            values = fn([tokenizer.decode(p, skip_special_tokens=True) for p in prompts],
                        [tokenizer.decode(r, skip_special_tokens=True) for r in responses])
        except Exception as e:  # the user's code: its failure is theirs to see, named, in one line
            raise RewardFunctionError(f"the reward function {name} raised {type(e).__name__}: {e}") from e
        try:
            scores = [float(v) for v in values]
        except (TypeError, ValueError) as e:
            raise RewardFunctionError(f"the reward function {name} must return a list of numbers ({e})") from None
        if len(scores) != len(responses):
            raise RewardFunctionError(f"the reward function {name} returned {len(scores)} scores for "
                                      f"{len(responses)} responses")
        return torch.tensor(scores, dtype=torch.float32)
    return score


def response_logprobs(model, packed: PackedBatch, temperature: float, *, with_entropy: bool = False,
                      value_head: torch.nn.Module | None = None, invariant: BatchInvariant | None = None):
    """One packed forward of a causal LM over the rollout.

    Returns (logp [R, T], entropy [R, T] or None, values [R, T] or None): log-probs of the response
    tokens under softmax(logits / temperature) through the fused LM-head kernel, and when a value
    head sharing the trunk is given, its value at each response token's predicting position.
    invariant: run the forward and head in that batch-invariant mode instead (no autograd needed):
    the log-probs then equal, bit for bit, those of a sampler in the same mode.
    """
    if invariant is None:
        hidden = model.forward_packed(packed.input_ids, packed.seqlens, packed.positions,
                                      packed.cu_seqlens)                       # [N, H]
        h = hidden.index_select(0, packed.target_rows)                         # [M, H]
        out = lm_head_logprobs(h, model.lm_head.weight, packed.target_ids, temperature=temperature,
                               with_entropy=with_entropy)
    else:
        # The mode reads the parameters directly, past FSDP's forward hooks: whole weights while it runs.
        with distributed.gathered(model):
            hidden = invariant.packed_hidden(model, packed.input_ids, packed.seqlens)
            h = hidden.index_select(0, packed.target_rows)
            out = invariant.head_logprobs(h, model.lm_head.weight, packed.target_ids, temperature=temperature,
                                          with_entropy=with_entropy)
    logp, entropy = out if with_entropy else (out, None)
    values = None if value_head is None else packed.to_grid(value_head(h).squeeze(-1).float())
    return packed.to_grid(logp), None if entropy is None else packed.to_grid(entropy), values


def policy_forward(models: "PPOModels", packed: PackedBatch, temperature: float, with_entropy: bool,
                   exact: bool = False):
    """(logp, entropy or None, values or None when critic-free) [R, T] of the policy and critic
    on a packed rollout; exact: the policy in the actor's batch-invariant mode (rollout.exact)."""
    logp, entropy, values = response_logprobs(models.policy, packed, temperature, with_entropy=with_entropy,
                                              value_head=models.value_head,
                                              invariant=models.actor.batch_invariant if exact else None)
    if models.critic is not None:
        values = models.critic.response_values(packed)
    return logp, entropy, values


def reference_logprobs(models: "PPOModels", packed: PackedBatch, temperature: float) -> torch.Tensor:
    """logp [R, T] of the frozen reference on a packed rollout (no gradient); with LoRA, the policy
    with its adapters off."""
    lora = models.lora
    with torch.no_grad(), (lora.disabled() if lora is not None else contextlib.nullcontext()):
        return response_logprobs(models.reference or models.policy, packed, temperature)[0]
