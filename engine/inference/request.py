"""Request: what the engine is asked to generate for one row (one sample of one prompt).

Every way of generating is a list of Requests run through one loop (`LLM.run`): `generate` asks
for params.n samples of each prompt, a Request with an `answer` continues one carried from an
earlier call, `generate_turns` asks for trajectories whose finished turns pause for an
environment's reply. The mode lives in the request's fields and in the run's hooks, never in a
field of the Sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

from .sampling_params import SamplingParams


@dataclass(frozen=True)
class Request:
    """prompt: token ids [P]; answer: tokens already generated after it (a carried answer:
    prefilled with the prompt, counted in params.max_new_tokens); sample_index: which of the
    prompt's samples this is (with params.seed its random stream is fixed by (seed, prompt,
    sample_index)); seed: an explicit random stream instead (a carried answer's own);
    max_total_tokens: a cap on prompt + everything after it below the model's context (a
    multi-turn trajectory's total); images: a vision-language model's prompt's images, or None:
    an object with pixel_values [P, C * temporal_patch * patch**2] and image_grid_thw [I, 3] as
    transformers' Qwen2-VL image processor emits them, in the order of the prompt's placeholder
    runs (engine/data/vision_processor.py's ImageInputs). The n samples of a prompt share one."""

    prompt: tuple[int, ...]
    params: SamplingParams
    answer: tuple[int, ...] = ()
    sample_index: int = 0
    seed: int | None = None
    max_total_tokens: int | None = None
    images: object | None = None

    def __post_init__(self):
        object.__setattr__(self, "prompt", tuple(self.prompt))
        object.__setattr__(self, "answer", tuple(self.answer))
