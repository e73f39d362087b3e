"""What an RL run (PPO, GRPO, distillation) carries from one iteration to the next besides the
weights and the optimizers: the loop state a checkpoint holds (`PPOState`, plain values; PPO's
controllers are restored from it: engine/stages/ppo/controllers.py)."""
from __future__ import annotations

import dataclasses

from ...train.supervised import DataPosition


@dataclasses.dataclass
class PPOState:
    """The loop state (engine/train/loop.py saves `dataclasses.asdict(state)` in every checkpoint
    and sets the fields back on resume)."""
    step: int = 0                 # iterations done
    # position in the prompt stream (dynamic sampling draws a varying number)
    prompts_drawn: int = 0
    kl_coef: float = 0.0
    moments: dict = dataclasses.field(default_factory=dict)
    ptx: dict = dataclasses.field(default_factory=lambda: dataclasses.asdict(DataPosition()))
    # rollout.partial_rollouts: this rank's groups in flight, their answers so far (partial.py:
    # each group's state_dict, engine/inference/in_flight.py)
    in_flight: list = dataclasses.field(default_factory=list)
