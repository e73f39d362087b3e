"""Drafts for speculative decoding by n-gram lookup in a sequence's own tokens (prompt lookup
decoding, Saxena 2023; vLLM's `ngram` speculator): no second model.

The draft of a sequence is what followed the latest earlier occurrence of its last n tokens (the
longest n in MAX_NGRAM..1 that occurred before). Long reasoning answers repeat themselves (restated
expressions, copied numbers, code): there the draft is often right and a step emits several tokens.
Each sequence keeps an index {n-gram: position after its latest occurrence}, extended as it grows.
"""
from __future__ import annotations

MAX_NGRAM = 3


class NgramIndex:
    """The n-grams (n = 1..MAX_NGRAM) of one token list and where each last ended."""

    def __init__(self):
        self.latest: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # tokens[:indexed] are in the index

    def draft(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram
        of `tokens` (the same list, grown, at every call)."""
        if k <= 0:
            return []
        # Index every n-gram ending before the last token: the suffix must match an earlier one.
        for end in range(max(self.indexed, 1), len(tokens)):
            for n in range(1, min(MAX_NGRAM, end) + 1):
                self.latest[tuple(tokens[end - n:end])] = end
        self.indexed = max(self.indexed, len(tokens))
        for n in range(min(MAX_NGRAM, len(tokens) - 1), 0, -1):
            start = self.latest.get(tuple(tokens[len(tokens) - n:]))
            if start is not None:
                return tokens[start:start + k]
        return []
