"""A PPO batch of experience: R sequences (prompt + sampled response), per-token data as [R, T].

T is the longest response; `mask` [R, T] is True on each row's response tokens. A row's sequence is
packed for the training forward as prompt + response, and the hidden state at the position before
each response token is the one that predicts it (and whose value the critic reads).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ....kernels import linear_token_logprobs


@dataclass
class PackedRollout:
    """R prompt + response sequences packed for one training forward.

    input_ids [N]; seqlens: R lengths; target_rows [M]: packed positions whose hidden state predicts
    a response token; target_ids [M]: those tokens; grid_index [M]: their flat index in [R, T].
    """
    input_ids: torch.Tensor
    seqlens: list[int]
    target_rows: torch.Tensor
    target_ids: torch.Tensor
    grid_index: torch.Tensor
    num_rows: int
    width: int

    def to_grid(self, values: torch.Tensor) -> torch.Tensor:
        """Per-target values [M] -> [R, T], zeros off the responses."""
        grid = values.new_zeros(self.num_rows * self.width)
        return grid.index_copy(0, self.grid_index, values).view(self.num_rows, self.width)

    def mask(self) -> torch.Tensor:
        return self.to_grid(torch.ones_like(self.target_ids, dtype=torch.float32)) > 0


def pack_rollout(prompts: list[list[int]], responses: list[list[int]], device,
                 width: int | None = None) -> PackedRollout:
    """Pack prompt + response pairs; ``width`` (default: the longest response) is T of the grid."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"pack_rollout: need as many responses as prompts (> 0), got "
                         f"{len(prompts)} prompts and {len(responses)} responses")
    width = width or max(len(r) for r in responses)
    ids, seqlens, rows, targets, grid = [], [], [], [], []
    for r, (prompt, response) in enumerate(zip(prompts, responses)):
        if not prompt or not response or len(response) > width:
            raise ValueError(f"pack_rollout: row {r} has {len(prompt)} prompt and {len(response)} "
                             f"response tokens; both must be >= 1 and the response <= width {width}")
        start = len(ids) + len(prompt) - 1          # position predicting the first response token
        rows += range(start, start + len(response))
        targets += response
        grid += range(r * width, r * width + len(response))
        ids += prompt + response
        seqlens.append(len(prompt) + len(response))
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return PackedRollout(as_long(ids), seqlens, as_long(rows), as_long(targets), as_long(grid),
                         len(prompts), width)


def response_logprobs(model, packed: PackedRollout, temperature: float, *, with_entropy: bool = False,
                      value_head: torch.nn.Module | None = None):
    """One packed forward of a causal LM over the rollout.

    Returns (logp [R, T], entropy [R, T] or None, values [R, T] or None): log-probs of the response
    tokens under softmax(logits / temperature) through the fused LM-head kernel, and when a value
    head sharing the trunk is given, its value at each response token's predicting position.
    """
    hidden = model.forward_packed(packed.input_ids, packed.seqlens)            # [N, H]
    h = hidden.index_select(0, packed.target_rows)                             # [M, H]
    weight = model.lm_head.weight
    out = linear_token_logprobs(h.to(weight.dtype), weight, packed.target_ids, temperature=temperature,
                                return_entropy=with_entropy)
    logp, entropy = out if with_entropy else (out, None)
    values = None if value_head is None else packed.to_grid(value_head(h).squeeze(-1).float())
    return packed.to_grid(logp), None if entropy is None else packed.to_grid(entropy), values


@dataclass
class Rollout:
    """Everything one PPO iteration learns from. Per-token fields are [R, T] fp32 (mask bool)."""
    prompts: list[list[int]]
    responses: list[list[int]]
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
        """The sub-batch of the given rows (same width T)."""
        pick = torch.tensor(index, device=self.mask.device)
        fields = {name: (value.index_select(0, pick) if isinstance(value, torch.Tensor)
                         else [value[i] for i in index]) for name, value in vars(self).items()}
        return Rollout(**fields)

    def packed(self) -> PackedRollout:
        return pack_rollout(self.prompts, self.responses, self.mask.device, width=self.mask.shape[1])
