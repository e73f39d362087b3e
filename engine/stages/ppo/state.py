"""What a PPO run carries from one iteration to the next besides the weights and the optimizers:
the loop state a checkpoint holds (`PPOState`, plain values) and the controllers an iteration runs
on (`Controllers`: the KL coefficient's controller and the running moments of the scores), restored
from it at the start of each iteration and saved back once the iteration has learned, so the loop
state stays the one copy of them."""
from __future__ import annotations

import dataclasses

from ...config.ppo import RewardConfig
from ...train.supervised import DataPosition
from .advantages import KLController, RunningMoments


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
    # rollout.partial_rollouts: this rank's groups in flight, their answers so far (partial.py)
    in_flight: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Controllers:
    """The KL controller (beta of the reward's KL penalty, adaptive with reward.kl_target) and the
    running moments that normalize the scores (reward.normalize)."""
    kl: KLController
    moments: RunningMoments

    @classmethod
    def restore(cls, state: PPOState, reward: RewardConfig) -> "Controllers":
        moments = RunningMoments()
        if state.moments:
            moments.load_state_dict(state.moments)
        return cls(KLController(state.kl_coef, reward.kl_target, reward.kl_horizon), moments)

    def save(self, state: PPOState) -> None:
        state.kl_coef, state.moments = self.kl.value, self.moments.state_dict()
