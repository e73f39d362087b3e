"""What the layers below the stages read of a stage's config, as one small typed input: the
parallel layout's refusals (engine/parallel/validate.py) and the memory plan (engine/plan/) take a
`ParallelJob`, which each stage's config builds (`parallel_job()` on SFT's, RM's and PPO's
configs), and read no stage section (`rollout`, `teacher`, ...) by name. Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ParallelJob:
    """A stage's parallel options and the facts of its config they are checked against.

    train: the stage's `train` section (every stage's RunConfig, the RL loop's LoopConfig);
    lora_rank: lora.rank (0: the weights train); trained_model: the model directory trained
    expert- or context-parallel (SFT's model, PPO/GRPO's policy; None where neither runs: the
    reward-model stage); persistent_weights: rollout.persistent_weights (False without a rollout);
    refuse_pairs(moe): the config's compatibility table again (`moe`: whether the trained model is
    a mixture of experts, None when not read).
    """

    train: object
    lora_rank: int
    trained_model: str | None
    persistent_weights: bool
    refuse_pairs: Callable[[bool | None], None]
