"""Sequence: the state of one completion being generated (pure Python, no tensors)."""
from __future__ import annotations

from enum import Enum, auto

from .ngram_draft import NgramIndex
from .sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    PAUSED = auto()  # a multi-turn sequence between turns: its KV blocks kept for the next one
    FINISHED = auto()


class Sequence:
    """Prompt + generated tokens, the KV blocks holding them, and the sampled tokens' log-probs.

    `seed` drives this sequence's random stream; `num_cached_tokens` counts leading tokens whose K/V
    are already in its blocks when it is (re)admitted (shared prefix blocks, or its own earlier
    turns), so prefill skips them. `turn_start` is where the tokens sampled in the current turn
    begin (the prompt's end for a single-turn sequence); `pauses`: a multi-turn sequence keeps its
    blocks when a turn ends (turns.py) instead of finishing; `token_limit` caps its length below
    the model's context (a multi-turn trajectory's total-token cap).
    """

    def __init__(self, seq_id: int, token_ids: list[int], params: SamplingParams, seed: int,
                 num_prompt_tokens: int | None = None):
        """num_prompt_tokens: where the answer starts (default: all of token_ids are the prompt; a
        continued answer's earlier tokens count against params.max_new_tokens)."""
        self.seq_id = seq_id
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids) if num_prompt_tokens is None else num_prompt_tokens
        self.params = params
        self.seed = seed
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.turn_start = self.num_prompt_tokens
        self.pauses = False
        self.token_limit: int | None = None
        self.logprob_slots: list[int] = []  # where each sampled log-prob is on the device (runner)
        self.logprobs: list[float] = []  # their values, read back once the generate call ends
        # MoE routing record of each forwarded position (routing_record.py)
        self.routing_rows: list[int] = []
        self.finish_reason: str | None = None
        self.draft_index = NgramIndex()  # speculative decoding's drafts (ngram_draft.py)
        self.chunk_end: int | None = None  # chunked prefill: this step prefills up to here

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append(self, token_id: int):
        self.token_ids.append(token_id)
