"""The tool demo's task, data, tokenizer and tool (`fusedrl demo task=tool`), built from nothing:
add two multi-digit numbers. The user asks "4821 + 377"; a program judges the final answer "5198".
A tiny model does not learn carrying from a thousand sums, but it can call the `add` tool (Hermes
`<tool_call>` blocks) and copy its result. The SFT demonstrations call the tool only sometimes and
answer directly otherwise, so the SFT policy is a mediocre adder; GRPO with the program's reward
teaches it to call the tool. The recipe is engine/demos/tool.py.
"""
from __future__ import annotations

import functools
import random
import re
from pathlib import Path

from ..config.demo import DemoConfig
from .sorting_task import write_jsonl

SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CALL_TOKENS = ["<tool_call>", "</tool_call>"]  # not special: the tool-call parser reads them
# Qwen's shape: the tools' names in a system message, a tool call as a Hermes block after the
# assistant's content (OpenAI/TRL `tool_calls` in SFT data), <|im_end|> ending every message.
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t.function.name }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>\n{% "
    "endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Each digit, each whitespace character and each run of anything else (with the space before it)
# is a word: exact round trips, and a tool call of 18 tokens.
WORDS = r"\d| ?[^\d\s]+|\s"


def add(a: int, b: int) -> int:
    """Add two integers exactly: the demo's calculator.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


# --- the task ----------------------------------------------------------------------------------

def question(a: int, b: int) -> str:
    return f"{a} + {b}"


def is_correct(prompt: str, answer: str) -> bool:
    """The program's judgement: `answer` is the sum of the two numbers of `prompt`."""
    a, b = map(int, re.findall(r"\d+", prompt))
    return answer.strip() == str(a + b)


def final_answer(completion: list[dict]) -> str:
    """The model's last turn of a trajectory's messages after its opening (TRL's `completions` of a
    multi-turn row, engine/agents' AgentTrajectory.messages): the answer the program judges, or
    "" when the model never spoke. A trajectory whose last turn is a tool call has no answer."""
    said = [m["content"] for m in completion if m["role"] == "assistant"]
    return said[-1] if said else ""


def tool_reward(prompts: list, completions: list[list[dict]], **columns) -> list[float]:
    """GRPO's reward (TRL's keyword form): 1.0 when the trajectory's final answer is the sum. It
    reads the messages, as the held-out evaluation does: the model's token ids alone
    (`completion_ids`) leave out the tool's result and the turns' headers."""
    return [float(is_correct(p, final_answer(c))) for p, c in zip(prompts, completions)]


def conversation(a: int, b: int, call: bool) -> list[dict]:
    """A demonstration: the question, then the tool call, its result and the answer (`call`), or the
    answer at once."""
    turns = [{"role": "user", "content": question(a, b)}]
    if call:
        turns += [{"role": "assistant", "tool_calls": [
                      {"type": "function",
                       "function": {"name": "add", "arguments": {"a": a, "b": b}}}]},
                  {"role": "tool", "name": "add", "content": str(add(a, b))}]
    return turns + [{"role": "assistant", "content": str(add(a, b))}]


def make_pairs(n: int, digits: int, rng: random.Random,
               exclude: set = frozenset()) -> list[tuple[int, int]]:
    """n distinct pairs of numbers of `digits` digits, each below half of 10 ** digits so that their
    sum has as many digits: every copy (question -> call, result -> answer) spans a fixed
    distance."""
    out, seen = [], set(exclude)
    while len(out) < n:
        a, b = (rng.randrange(10 ** (digits - 1), 10 ** digits // 2) for _ in range(2))
        if (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
    return out


def write_tool_data(cfg: DemoConfig, data_dir: Path, tools: list[dict]) -> dict:
    """SFT conversations (cfg.tool_calls of them call the tool), GRPO prompts and held-out
    questions, three disjoint sets of pairs. `tools`: the tools' schemas, each row's `tools`
    column. GRPO's questions are new to the SFT policy: on the demonstrations' own it recalls
    the sums it was shown, the reward is ~1 whether it calls the tool or not, and GRPO has little
    to learn from."""
    rng = random.Random(cfg.seed)
    train = make_pairs(cfg.train_prompts, cfg.digits, rng)
    held_out = make_pairs(cfg.eval_prompts, cfg.digits, rng, exclude=set(train))
    data_dir.mkdir(parents=True, exist_ok=True)
    demos = [{"messages": conversation(a, b, rng.random() < cfg.tool_calls), "tools": tools}
             for a, b in train]
    rl = make_pairs(cfg.train_prompts, cfg.digits, rng, exclude=set(train) | set(held_out))
    return {
        "sft": write_jsonl(data_dir / "demonstrations.jsonl", demos),
        "prompts": write_jsonl(data_dir / "prompts.jsonl",
                               [{"prompt": question(a, b)} for a, b in rl]),
        "held_out": [question(a, b) for a, b in held_out],
    }


# --- the tokenizer -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast` (WORDS) with CHAT_TEMPLATE, over every word the
    template writes for the task's conversations."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def tokenizer(vocab: list[str]):
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(WORDS), behavior="isolated")
        tok.decoder = decoders.Fuse()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                       pad_token="<pad>", unk_token="<unk>",
                                       additional_special_tokens=["<|im_start|>"])
        fast.add_tokens(CALL_TOKENS)
        fast.chat_template = CHAT_TEMPLATE
        return fast

    from ..agents import tool_schema
    text = tokenizer(SPECIAL + CALL_TOKENS).apply_chat_template(
        conversation(1234567890, 1, call=True), tools=[tool_schema(add)], tokenize=False)
    for token in SPECIAL + CALL_TOKENS:  # split off before the words, as the tokenizer does
        text = text.replace(token, "\n")
    words = {w for w, _ in pre_tokenizers.Split(Regex(WORDS), "isolated").pre_tokenize_str(text)}
    return tokenizer(SPECIAL + CALL_TOKENS + sorted(words))
