"""SamplingParams: how to draw the completions of one prompt. Validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass

# The smallest temperature but 0 (greedy). Below it sampling is greedy in all but name (two
# logits 0.01 apart are 100 apart once scaled: the lesser token is e^-100, about 4e-44, times as
# likely), and far below it the scaled logits (logit / temperature, in fp32) overflow to inf, from
# about 3e-39 in the inverse temperature itself: the draw's log-probs come out NaN, which would
# then be blamed on the model. config/rollout.py and config/distill.py keep the same floor.
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (else at least MIN_TEMPERATURE). top_k 0, top_p 1.0 and min_p
    0.0 switch those filters off (min_p keeps the tokens at least min_p times as likely as the most
    likely one). With a seed, the completions are reproducible whatever else is in the batch (see
    engine.sampler)."""

    n: int = 1  # completions per prompt; they share the prompt's KV blocks
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()  # finish on any of these, in addition to EOS
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        _check(isinstance(self.n, int) and self.n >= 1, "n", self.n, "an int >= 1")
        _check(_is_number(self.temperature)
               and (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < math.inf),
               "temperature", self.temperature,
               f"0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", self.top_k,
               "an int >= 0 (0 = off)")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p,
               "a number in (0, 1]")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p,
               "a number in [0, 1]")
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens",
               self.max_new_tokens, "an int >= 1")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "a sequence of non-negative ints")
        _check(self.seed is None or isinstance(self.seed, int), "seed", self.seed, "an int or None")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(ok: bool, name: str, value, expected: str):
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: expected {expected}")
