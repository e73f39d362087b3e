"""Environments of three turns for turn-level credit (reward.per_turn): agent_fault_envs.ThreeTurns
with its rewards fixed per turn, the trajectory done after the third. Torch-free, as what it
imports: each trajectory's environment worker imports this module."""
from agent_fault_envs import ThreeTurns


class LastTurnPays(ThreeTurns):
    """`rollout.environment=turn_testing:LastTurnPays`: turns 1 and 2 earn 0, the third 1."""
    rewards = (0.0, 0.0, 1.0)

    def step(self, message):
        messages, _, done = super().step(message)
        return messages, self.rewards[self.turn - 1], done


class EveryTurnPays(LastTurnPays):
    """Turn k earns k / 10: each turn's reward tells which turn it was."""
    rewards = (0.1, 0.2, 0.3)


class FoxPaysNothing(ThreeTurns):
    """`rollout.environment=turn_testing:FoxPaysNothing`: a prompt about a fox earns 0 at every
    turn (its group's scores are all equal), any other the vowel share of each turn."""

    def step(self, message):
        messages, reward, done = super().step(message)
        return messages, 0.0 if "fox" in self.prompt else reward, done
