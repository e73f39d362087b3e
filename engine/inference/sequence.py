"""Sequence: the state of one completion being generated (pure Python, no tensors)."""
from __future__ import annotations

from enum import Enum, auto

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

    def __init__(self, seq_id: int, token_ids: list[int], params: SamplingParams, seed: int):
        self.seq_id = seq_id
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.seed = seed
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.turn_start = len(token_ids)
        self.pauses = False
        self.token_limit: int | None = None
        self.logprob_slots: list[int] = []  # where each sampled log-prob is on the device (runner)
        self.logprobs: list[float] = []  # their values, read back once the generate call ends
        self.routing_rows: list[int] = []  # MoE routing record of each forwarded position (routing_record.py)
        self.finish_reason: str | None = None

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
