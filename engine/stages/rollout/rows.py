"""The rows in flight, whatever their kind and schedule: one engine run advancing them
(`advance_rows`, over a row kind's `advance(rows, stop)`: answer_rows.advance_answers,
engine/agents CarriedTrajectories.advance) and the `Generated` rows of complete groups
(`generated_of`), both once for every mode. Whole groups are groups advanced once with no stop
rule and nothing carried (whole_groups.py); partial rollouts carry theirs across iterations under a
stop rule (partial.py).

Rows are ordered group by group, sample by sample, so rows g*n .. g*n + n - 1 are group g.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ...data.device_tensors import device_tensor
from ...inference.in_flight import Group, Sample
from .models import PPOModels
from .sampled_rows import Generated, sampled_routing

Rows = list[tuple[Group, Sample]]
# A row kind's engine run: continue `rows` in place under a stop rule (None: to their end),
# returning the run's Sequences.
Advance = Callable[[Rows, object], list]


def advance_rows(models: PPOModels, rows: Rows, advance: Advance, stop, version: int,
                 carried: Optional[list[Group]] = None) -> int:
    """Continue `rows` in one engine run (advance(rows, stop)), recording the `version` (the
    iteration) of each new model token and each row's routing records (those of the whole
    sequence this run forwarded; routing replay). carried: the groups in flight when they carry on
    across iterations: under context parallelism every rank of a context group takes its first
    rank's (each generated the group's rows). Returns the model tokens drawn."""
    before = [len(sample.logprobs) for _, sample in rows]
    seqs = advance(rows, stop)
    cp = None if carried is None else models.policy.context_parallel
    if cp is not None:
        for group, first in zip(carried, cp.same_on_ranks([g.state_dict() for g in carried])):
            group.load_state_dict(first)
    drawn = 0
    for (_, sample), had in zip(rows, before):
        sample.versions += [version] * (len(sample.logprobs) - had)
        drawn += len(sample.logprobs) - had
    routing = sampled_routing(models)
    if routing is not None:  # row after row: each whole sequence
        for (_, sample), part in zip(rows, routing.split([seq.num_tokens for seq in seqs])):
            sample.routing = part
    return drawn


def generated_of(groups: list[Group], n: int, device,
                 trajectories: Optional[list] = None) -> Generated:
    """The rows of complete groups, each sample's log-probs as its tokens drew them; each row's
    routing records cut or padded to the row (-1: it routes freely; a reply kept after a stopped
    run was not forwarded), None without routing replay; trajectories: each row's engine/agents
    AgentTrajectory (multi-turn: its model mask, environment rewards, conversation; one that left
    the batch on an environment's error has no target)."""
    rows = [(g.prompt, s) for g in groups for s in g.samples]
    left = [t is not None and t.error is not None for t in trajectories or [None] * len(rows)]
    logprobs = device_tensor([x for (_, s), out in zip(rows, left) if not out
                              for x in s.logprobs], torch.float32, device)
    sources = ([g.source for g in groups] if all(g.source is not None for g in groups)
               else None)
    masks = env_rewards = None
    if trajectories is not None:
        masks = [[False] * len(s.model_mask) if t.error else s.model_mask
                 for (_, s), t in zip(rows, trajectories)]
        env_rewards = [[] if t.error else list(t.turn_rewards) for t in trajectories]
    return Generated([list(p) for p, _ in rows], [list(s.tokens) for _, s in rows], logprobs, n,
                     sources, masks, env_rewards, trajectories, joined_routing(rows))


def joined_routing(rows: list[tuple[list[int], Sample]]) -> Optional[torch.Tensor]:
    """The rows' routing records, each cut or padded (-1) to its prompt and tokens, joined row
    after row; None when no row has any."""
    known = next((s.routing for _, s in rows if s.routing is not None), None)
    if known is None:
        return None
    parts = []
    for prompt, sample in rows:
        length = len(prompt) + len(sample.tokens)
        part = known.new_full((length, *known.shape[1:]), -1)
        if sample.routing is not None:
            part[:min(length, len(sample.routing))] = sample.routing[:length]
        parts.append(part)
    return torch.cat(parts)
