"""The multi-turn tests' environment and tools, in a module that imports nothing heavy: an
environment's worker process (rollout.env_isolation=process) starts per trajectory and imports
it, in a fraction of a second (a module importing torch would take seconds each time)."""
from agent_fault_envs import add, stuck  # noqa: F401  (`agent_envs:add`, `agent_envs:stuck`)


class ThreeTurns:
    """A scripted environment (`rollout.environment=agent_envs:ThreeTurns`): three turns, each
    answered by an observation longer than a turn; a turn's reward is its share of vowels."""

    def __init__(self, prompt, **columns):
        self.prompt, self.turn = prompt, 0

    def reset(self):
        return [{"role": "user", "content": self.prompt}]

    def step(self, message):
        self.turn += 1
        text = message["content"]
        reward = sum(c in "aeiou" for c in text) / max(len(text), 1)
        observation = "the lazy dog jumps over the quick brown fox"
        return [{"role": "user", "content": observation}], reward, self.turn == 3


def broken(x: int) -> int:
    """A tool that raises.

    Args:
        x: Anything.
    """
    raise RuntimeError("the tool broke")


class LoadedLibraries:
    """An environment whose first observation names the heavy libraries its process has loaded
    (torch, numpy, transformers, triton), comma-separated ("" for none)."""

    def __init__(self, prompt, **columns):
        pass

    def reset(self):
        import sys
        heavy = [name for name in ("torch", "numpy", "transformers", "triton") if name in sys.modules]
        return [{"role": "user", "content": ",".join(heavy)}]

    def step(self, message):
        return [], 0.0, True
