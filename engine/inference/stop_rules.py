"""When a run (`LLM.run`) stops before every sequence is done: rules called after each step with
the request indices that ended in it and the tokens it drew; the first that says so stops the run
(its unfinished sequences are stopped, finish_reason None). Without a rule a run ends when every
sequence is done.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

StopRule = Callable[[list[int], int], bool]  # (request indices ended in the step, tokens drawn)


class TokenBudget:
    """Stop once `budget` tokens were drawn (the step that passes it ends: a step draws a token a
    row, a speculative step up to its accepted drafts and one more)."""

    def __init__(self, budget: int):
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"token_budget={budget!r}: expected an int >= 1")
        self.budget, self.drawn = budget, 0

    def __call__(self, ended: list[int], drawn: int) -> bool:
        self.drawn += drawn
        return self.drawn >= self.budget


class GroupsDone:
    """Stop once `needed` groups (a prompt's samples) have all their rows ended: request i is of
    group groups[i]."""

    def __init__(self, groups: list[int], needed: int):
        if not isinstance(needed, int) or needed < 1:
            raise ValueError(f"groups_needed={needed!r}: expected an int >= 1")
        self.groups, self.left = list(groups), Counter(groups)
        self.needed, self.complete = needed, 0

    def __call__(self, ended: list[int], drawn: int) -> bool:
        for index in ended:
            group = self.groups[index]
            self.left[group] -= 1
            self.complete += self.left[group] == 0
        return self.complete >= self.needed


def first_of(*rules: StopRule | None) -> StopRule | None:
    """One rule that stops when any of `rules` (None ones skipped) does; every rule sees every
    step (each keeps its own count). None when no rule is given."""
    rules = [rule for rule in rules if rule is not None]
    if not rules:
        return None
    return lambda ended, drawn: any([rule(ended, drawn) for rule in rules])
