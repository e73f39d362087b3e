"""The controllers a PPO iteration runs on (`Controllers`: the KL coefficient's controller and the
running moments of the scores), restored from the loop state (engine/stages/rollout/state.py) at
the start of each iteration and saved back once the iteration has learned, so the loop state stays
the one copy of them."""
from __future__ import annotations

import dataclasses

from ...config.ppo import RewardConfig
from ..rollout.state import PPOState
from .advantages import KLController, RunningMoments


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
