"""Config of `fusedrl generate`: the model, the prompts, how to sample and where to run. Torch-free.

Read like every stage's config (engine/config/io.py: a YAML file, then `key=value` overrides); the
command's flags (`--max-new-tokens 64`) are aliases of these keys (engine/cli/generate.py)."""
from __future__ import annotations

from dataclasses import dataclass

from .fields import check, option


@dataclass
class GenerateConfig:
    model: str = option("Hugging Face model directory (required)", "")
    prompts: list[str] = option("prompts to complete (also --prompt TEXT, repeatable)",
                                factory=list)
    prompt_file: str | None = option(
        "a file with one prompt per line, after `prompts`: a line's text, or of a JSON object line "
        "(every line of a .jsonl file, or of a file opening with one) its \"prompt\", a string "
        "or a message list (with chat_template=true), as a run's prompts file holds it")
    images: list[str] = option("image files every prompt opens with (also --image FILE, "
                               "repeatable), for a vision-language model", factory=list)
    n: int = option("completions per prompt", 1)
    max_new_tokens: int = option("tokens to generate at most per completion", 128)
    temperature: float = option("sampling temperature; 0 = greedy", 1.0)
    top_k: int = option("sample among the k likeliest tokens; 0 = off", 0)
    top_p: float = option("sample among the likeliest tokens holding this much probability; "
                          "1.0 = off", 1.0)
    seed: int | None = option("makes the completions reproducible")
    dtype: str = option("auto, float32, bfloat16 or float16", "auto")
    device: str | None = option("cuda or cpu (default: cuda when available)")
    kv_cache_memory: float | None = option("KV pool: bytes (e.g. 2000000000) or, up to 1, a "
                                           "fraction of free GPU memory (e.g. 0.5); default 0.9 "
                                           "of it on CUDA, 1 GiB on CPU")
    block_size: int = option("tokens of one KV block", 16)
    speculative_tokens: int = option("speculative decoding: rows draft up to this many tokens by "
                                     "n-gram lookup in their own text, verified in one forward "
                                     "(same tokens; fewer forwards where text repeats); 0 = off", 0)
    speculate_below: int = option("speculate on decode steps of fewer than this many rows", 8)
    tensor_parallel: int = option("under torchrun: T ranks generate together from their slices "
                                  "of the weights", 1)
    chat_template: bool = option(
        "render each prompt as a user turn through the model directory's chat template, with its "
        "generation prompt (as a run renders a string prompt: data/chat.py)", False)
    tools: list[str] = option(
        "'module:function' tools (also --tool, repeatable) whose JSON schemas the chat template "
        "offers the model (needs chat_template=true); the model's tool calls are printed, not run",
        factory=list)
    json: bool = option("print one JSON object per completion", False)
    progress: bool = option("show a progress bar on stderr", True)

    def __post_init__(self):
        check(not self.tools or self.chat_template,
              f"tools={self.tools} are offered through the chat template: set chat_template=true "
              "(--chat-template)")

    def kv_budget(self) -> int | float | None:
        """kv_cache_memory as LLM takes it: a fraction of free GPU memory (<= 1) or bytes."""
        value = self.kv_cache_memory
        return value if value is None or value <= 1 else int(value)
