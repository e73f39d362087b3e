"""When a partial rollout's generate call may stop early: once enough groups (a prompt's samples)
have all their rows finished."""
from __future__ import annotations

from collections import Counter

from .sequence import Sequence


class GroupsDone:
    """Counts finished rows per group: rows[i] of group groups[i]; `__call__(finished)` after each
    step says whether `needed` groups are complete."""

    def __init__(self, rows: list[Sequence], groups: list[int], needed: int):
        self.group_of = {seq.seq_id: g for seq, g in zip(rows, groups)}
        self.left = Counter(groups)
        self.needed, self.complete = needed, 0

    def __call__(self, finished: list[Sequence]) -> bool:
        for seq in finished:
            group = self.group_of[seq.seq_id]
            self.left[group] -= 1
            self.complete += self.left[group] == 0
        return self.complete >= self.needed
