"""Speculative decoding's drafts as a part of the engine's loop (engine_loop.py): which decode
steps draft (the long tail), how long each row's draft may be, and the counts of drafted and
accepted tokens; each row's draft itself is its n-gram index's (ngram_draft.py).
"""
from __future__ import annotations

from .block_manager import BlockManager
from .sequence import Sequence


class Drafts:
    """Speculative decoding's drafts (LLM's speculative_tokens, speculate_below): on a decode step
    of fewer than `below` rows each row drafts up to `tokens` tokens (none at 0), within its token
    limits and the KV slots `blocks` gives it; the drafted and accepted tokens are counted until
    `take`."""

    def __init__(self, tokens: int, below: int, blocks: BlockManager, max_model_len: int):
        self.tokens, self.below = tokens, below
        self.blocks, self.max_model_len = blocks, max_model_len
        self.counts = {"drafted": 0, "accepted": 0}

    def propose(self, batch: list[Sequence]) -> list[list[int]] | None:
        """Each row's n-gram draft, cut to its token limits and to the KV slots free blocks give
        it; None (a plain decode step) off the tail or where no row has a draft."""
        if not self.tokens or len(batch) >= self.below:
            return None
        drafts = []
        for seq in batch:
            room = min(seq.params.max_new_tokens - (seq.num_tokens - seq.num_prompt_tokens),
                       self.max_model_len - seq.num_tokens) - 1  # the draw after the draft
            draft = seq.draft_index.draft(seq.token_ids, min(self.tokens, room))
            slots = (self.blocks.reserve(seq, seq.num_tokens + len(draft)) if draft
                     else seq.num_tokens)
            drafts.append(draft[:slots - seq.num_tokens])
        return drafts if any(drafts) else None

    def count(self, drafts: list[list[int]], emitted: list[list[int]]) -> None:
        """A verify step's drafts and the tokens each row emitted: its accepted draft tokens and
        the one draw after them."""
        self.counts["drafted"] += sum(map(len, drafts))
        self.counts["accepted"] += sum(len(tokens) - 1 for tokens in emitted)

    def take(self) -> dict:
        """{"drafted", "accepted"} since the last take (zeros without drafts); counts again."""
        counts, self.counts = self.counts, {"drafted": 0, "accepted": 0}
        return counts
