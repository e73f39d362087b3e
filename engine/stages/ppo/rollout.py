"""A PPO batch of experience: R sequences (prompt + sampled response), per-token data as [R, T].

T is the longest response; `mask` [R, T] is True on each row's response tokens. A row's sequence is
packed for the training forward as prompt + response (a PackedBatch whose targets are the response
tokens), and the hidden state at the position before each response token is the one that predicts it
(and whose value the critic reads).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...data.packing import PackedBatch, pack_sequences
from ...model.invariant import BatchInvariant
from ...model.lm_head import lm_head_logprobs
from ...train import distributed


def pack_rollout(prompts: list[list[int]], responses: list[list[int]], device,
                 width: int | None = None) -> PackedBatch:
    """Pack prompt + response pairs, the response tokens as targets on an [R, width] grid
    (default width: the longest response)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"pack_rollout: need as many responses as prompts (> 0), got "
                         f"{len(prompts)} prompts and {len(responses)} responses")
    width = width or max(len(r) for r in responses)
    for r, (prompt, response) in enumerate(zip(prompts, responses)):
        if not prompt or not response or len(response) > width:
            raise ValueError(f"pack_rollout: row {r} has {len(prompt)} prompt and {len(response)} "
                             f"response tokens; both must be >= 1 and the response <= width {width}")
    return pack_sequences([(p, r, True) for p, r in zip(prompts, responses)], width=width, device=device)


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
        hidden = model.forward_packed(packed.input_ids, packed.seqlens)        # [N, H]
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


@dataclass
class Rollout:
    """Everything one PPO iteration learns from. Per-token fields are [R, T] fp32 (mask bool)."""
    packed: PackedBatch           # the R prompt + response sequences, packed once per rollout
    mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    scores: torch.Tensor          # [R] reward-model (or function) scores, before normalization
    rewards: torch.Tensor         # per-token shaped rewards
    advantages: torch.Tensor
    returns: torch.Tensor

    def rows(self, index: list[int]) -> "Rollout":
        """The sub-batch of the given rows (same width T), its packing cut from this one's."""
        pick = torch.tensor(index, device=self.mask.device)
        fields = {name: value.index_select(0, pick) for name, value in vars(self).items()
                  if isinstance(value, torch.Tensor)}
        return Rollout(packed=self.packed.select(index), **fields)
