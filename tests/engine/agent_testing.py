"""Multi-turn test parts: a tiny qwen2 model saved with the tests' chat tokenizer (its template
takes tools: engine_testing.CHAT_TEMPLATE), and a tool call in the template's Hermes format."""
import json

# The tools and ThreeTurns live torch-free there: a worker process imports the module a spec names.
from agent_fault_envs import ThreeTurns, add, stuck  # noqa: F401
from engine_testing import make_chat_tokenizer, make_hf_model


def save_chat_model(path, **overrides):
    """A tiny qwen2 model (config `overrides`) with the chat tokenizer in `path`."""
    make_hf_model("qwen2", **overrides).save_pretrained(path)
    make_chat_tokenizer().save_pretrained(path)
    return path


def tool_call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def broken(x: int) -> int:
    """A tool that raises.

    Args:
        x: Anything.
    """
    raise RuntimeError("the tool broke")
