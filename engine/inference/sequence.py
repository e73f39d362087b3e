"""Sequence: the state of one request being generated (pure Python, no tensors)."""
from __future__ import annotations

from enum import Enum, auto

from .ngram_draft import NgramIndex
from .request import Request
from .sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    PAUSED = auto()  # a finished turn waiting for what follows it: its KV blocks kept
    FINISHED = auto()


class Sequence:
    """A Request's tokens so far (prompt, answer, what was sampled and appended), the KV blocks
    holding them, and where the sampled tokens' log-probs and routing records are.

    `seed` drives this sequence's random stream; `num_cached_tokens` counts leading tokens whose K/V
    are already in its blocks when it is (re)admitted (shared prefix blocks, or its own earlier
    turns), so prefill skips them. `turn_start` is where the tokens sampled in the current turn
    begin (the prompt's end until a turn is resumed: a carried answer counts in
    its params.max_new_tokens); `pauses`: a finished turn pauses
    with its blocks kept (a run with an on_end hook) instead of finishing.
    """

    def __init__(self, seq_id: int, request: Request, seed: int):
        self.seq_id = seq_id
        self.request = request
        self.token_ids = list(request.prompt) + list(request.answer)
        self.num_prompt_tokens = len(request.prompt)
        self.seed = seed
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.turn_start = self.num_prompt_tokens
        self.pauses = False
        self.logprob_slots: list[int] = []  # where each sampled log-prob is on the device (runner)
        self.logprobs: list[float] = []  # their values, read back once the run ends
        # MoE routing record of each forwarded position (routing_record.py)
        self.routing_rows: list[int] = []
        self.finish_reason: str | None = None
        self.draft_index = NgramIndex()  # speculative decoding's drafts (ngram_draft.py)
        self.chunk_end: int | None = None  # chunked prefill: this step prefills up to here
        self.prefilled_tokens = 0  # tokens sent through prefill (a chunk's, a resumed turn's)
        # A vision-language prompt's images (request.images) and their digest, its M-RoPE
        # positions [3][P] and decode offset: token p >= P sits at p + rope_delta
        # (image_prefill.py sets them).
        self.images = request.images
        self.image_key: str | None = None
        self.mrope: list[list[int]] | None = None
        self.rope_delta = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

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


def routing_rows(seq: Sequence) -> list[int]:
    """One routing row per token of `seq` (LLM.device_routing), -1 where none was recorded: its
    last token (never forwarded), every token without record_routing."""
    return seq.routing_rows + [-1] * (seq.num_tokens - len(seq.routing_rows))
