"""Multi-turn test parts: a tiny qwen2 model saved with the tests' chat tokenizer (its template
takes tools: engine_testing.CHAT_TEMPLATE), and a tool call in the template's Hermes format."""
import json

from agent_fault_envs import add, stuck  # noqa: F401  (tools of the tests, torch-free there)
from engine_testing import make_chat_tokenizer, make_hf_model


def save_chat_model(path, **overrides):
    """A tiny qwen2 model (config `overrides`) with the chat tokenizer in `path`."""
    make_hf_model("qwen2", **overrides).save_pretrained(path)
    make_chat_tokenizer().save_pretrained(path)
    return path


def tool_call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


class ThreeTurns:
    """A scripted environment (`rollout.environment=agent_testing:ThreeTurns`): three turns, each
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
