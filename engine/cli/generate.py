"""`fusedrl generate`: complete prompts with the paged-KV engine, from a config read like every
stage's (engine/config/generate.py: a YAML file and `key=value` overrides); the command's flags
(`--max-new-tokens 64`, `--prompt TEXT`) are aliases of its keys. Torch-free until it runs."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

from .. import errors
from ..config import io as config_io
from ..config.generate import GenerateConfig
from ..runs import path_checks


# The longest --prompt-file line read (1 MiB: some 250k tokens, past any model's context).
MAX_PROMPT_BYTES = 2**20


def parse_memory(text: str | None) -> int | float | None:
    """--kv-cache-memory: '0.5' -> a fraction of free GPU memory (values <= 1); '2e9' or
    '2000000000' -> bytes; a UsageError for anything else (inf, nan, 0, a word)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        raise errors.UsageError(f"--kv-cache-memory {text}: expected bytes (e.g. 2000000000) or a "
                                "fraction of free GPU memory in (0, 1] (e.g. 0.5)")
    return value if value <= 1 else int(value)


class _Alias(argparse.Action):
    """A flag standing for a config key: its value becomes the override `key=value` (JSON: a YAML
    scalar or list the config reader parses back), in args.aliases; a repeated flag of a list key
    adds an item."""

    def __init__(self, *args, key: str, repeat: bool = False, convert=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.key, self.repeat, self.convert = key, repeat, convert

    def __call__(self, parser, namespace, value, option_string=None):
        aliases = dict(getattr(namespace, "aliases", None) or {})
        # Converted when the command runs (convert's UsageError is then its one-line error).
        value = self.const if self.nargs == 0 else (value, self.convert) if self.convert else value
        aliases[self.key] = [*aliases.get(self.key, []), value] if self.repeat else value
        namespace.aliases = aliases


# flag -> (config key, argparse options): the flags `fusedrl generate` had before it read a config.
_GENERATE_FLAGS = {
    "--model": ("model", {}), "--prompt": ("prompts", {"repeat": True}),
    "--prompt-file": ("prompt_file", {}), "--image": ("images", {"repeat": True}),
    "--n": ("n", {"type": int}), "--max-new-tokens": ("max_new_tokens", {"type": int}),
    "--temperature": ("temperature", {"type": float}), "--top-k": ("top_k", {"type": int}),
    "--top-p": ("top_p", {"type": float}), "--seed": ("seed", {"type": int}),
    "--dtype": ("dtype", {}),
    "--device": ("device", {}), "--kv-cache-memory": ("kv_cache_memory", {"convert": parse_memory}),
    "--block-size": ("block_size", {"type": int}),
    "--tensor-parallel": ("tensor_parallel", {"type": int}),
    "--speculative-tokens": ("speculative_tokens", {"type": int}),
    "--speculate-below": ("speculate_below", {"type": int}),
    "--chat-template": ("chat_template", {"nargs": 0, "const": True}),
    "--tool": ("tools", {"repeat": True}),
    "--json": ("json", {"nargs": 0, "const": True}),
    "--no-progress": ("progress", {"nargs": 0, "const": False}),
}


def add_generate_parser(commands, add_debug_flag) -> None:
    """The `generate` subparser of `commands`, with the command's --debug flag (add_debug_flag)."""
    p = commands.add_parser("generate", help="generate completions with the paged-KV engine",
                            description="complete prompts; text (or json=true lines) to stdout, "
                                        "progress to stderr",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=lambda: config_io.options_epilog(GenerateConfig))
    p.add_argument("--config", help="YAML file with the options below")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="options overriding the file")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit")
    for flag, (key, options) in _GENERATE_FLAGS.items():
        p.add_argument(flag, action=_Alias, key=key, default=argparse.SUPPRESS,
                       help=f"the same as {key}=VALUE", **options)
    add_debug_flag(p)
    p.set_defaults(run=run_generate)


def _alias_overrides(args) -> list[str]:
    """The flags given, as `key=value` overrides."""
    overrides = []
    for key, value in getattr(args, "aliases", {}).items():
        if isinstance(value, tuple):  # (text, its converter)
            value = value[1](value[0])
        overrides.append(f"{key}={json.dumps(value)}")
    return overrides


def _as_option(error: ValueError) -> errors.UsageError:
    """SamplingParams names its fields (SamplingParams.top_p): say which option the user gave
    (--top-p)."""
    return errors.UsageError(
        re.sub(r"SamplingParams\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), str(error)))


def _generate_tensor_parallel(cfg, prompts, params, device):
    from ..inference.parallel_generate import generate_tensor_parallel
    return generate_tensor_parallel(cfg.model, prompts, params, cfg.tensor_parallel, device=device,
                                    dtype=cfg.dtype, use_tqdm=cfg.progress,
                                    kv_cache_memory=cfg.kv_budget(), block_size=cfg.block_size,
                                    speculative_tokens=cfg.speculative_tokens,
                                    speculate_below=cfg.speculate_below)


def _prompts(cfg) -> list[str | list]:
    """cfg.prompts, then prompt_file's prompts (_file_prompt: a line's raw text, or a JSON object
    line's "prompt")."""
    from ..data.records import DataError, decode_line, numbered_lines
    prompts = list(cfg.prompts)
    if cfg.prompt_file:
        if os.path.exists(cfg.prompt_file) and not os.path.isfile(cfg.prompt_file):
            raise errors.UsageError(f"--prompt-file {cfg.prompt_file}: not a regular file (a "
                                    "directory, FIFO or device); expected a text file of one "
                                    "prompt per line")
        # A .jsonl file, or one whose first line is a JSON object, is a prompts file as a run
        # reads it: a line there that is not an object is a mistake, not a prompt.
        rows = cfg.prompt_file.endswith(".jsonl")
        read = []
        try:
            for lineno, raw in numbered_lines(cfg.prompt_file, MAX_PROMPT_BYTES):
                try:
                    line = decode_line(raw)
                    prompt, row = _file_prompt(line, cfg)
                    rows = rows or (row and not read)
                    if rows and not row:
                        raise ValueError("expected a JSON object with a \"prompt\" (the file's "
                                         f"lines are JSON objects), got {line.strip()[:60]!r}")
                except ValueError as e:
                    raise DataError(f"{cfg.prompt_file}:{lineno}: {e}") from None
                read.append(prompt)
        except OSError as e:
            raise errors.UsageError(f"--prompt-file {cfg.prompt_file}: {e.strerror}") from None
        if not read:
            raise errors.UsageError(f"--prompt-file {cfg.prompt_file} has no prompts (it is "
                                    "empty or blank); expected one prompt per line")
        prompts += read
    if not prompts:
        raise errors.UsageError(
            "give --prompt TEXT (repeatable) or --prompt-file FILE (the options prompts, "
            "prompt_file)")
    return prompts


def _file_prompt(line: str, cfg) -> tuple[str | list, bool]:
    """(the prompt of one --prompt-file line, whether the line is a JSON object). A JSON object
    is a row of a run's prompts file (data/prompts.py): its "prompt" is a string, or a message
    list rendered through the chat template (with --chat-template, without --image); any other
    line is the prompt's raw text. ValueError for an object without a usable prompt."""
    from ..data.records import parse_turns
    try:
        row = json.loads(line) if line.lstrip().startswith("{") else None
    except ValueError:
        row = None  # text that opens with a brace
    if not isinstance(row, dict):
        return line, False
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        parse_turns(prompt, "prompt")
        if not cfg.chat_template or cfg.images:
            raise ValueError('a message list as "prompt" is rendered through the chat template: '
                             "pass --chat-template (and no --image), or give the prompt as a "
                             "string")
        return prompt, True
    if not isinstance(prompt, str) or not prompt:
        got = repr(prompt)[:60] if "prompt" in row else f"the keys {sorted(row)}"
        raise ValueError('expected "prompt": a non-empty string or a message list, got '
                         f"{got}")
    return prompt, True


def _templated(cfg, prompts: list[str | list]) -> list[str]:
    """`prompts`, each rendered (a string as a user turn, a message list as its turns) by the model
    directory's chat template with the generation prompt and cfg.tools' schemas (data/chat.py's
    render_prompt: what a run's rollout opens with), when cfg.chat_template; else as they are.
    Before the model loads."""
    if not cfg.chat_template:
        return prompts
    from ..agents.tools import load_tools, tool_schema
    from ..data.chat import has_template, render_prompt
    from ..data.records import parse_turns
    from ..inference.llm import directory_tokenizer
    tools = load_tools(cfg.tools, "--tool")
    tokenizer = directory_tokenizer(Path(cfg.model))
    if tokenizer is None or not has_template(tokenizer):
        raise errors.UsageError(
            f"--chat-template: the tokenizer of --model {cfg.model} has no chat template "
            "(chat_template.jinja, or chat_template in tokenizer_config.json)")
    schemas = json.dumps([tool_schema(fn, "--tool") for fn in tools.values()]) if tools else None
    return [render_prompt(tokenizer, parse_turns(prompt, "prompt") if isinstance(prompt, list)
                          else (("user", prompt),), tools=schemas) for prompt in prompts]


def _with_images(cfg, prompts: list[str]) -> tuple[list[list[int]], list]:
    """Each prompt after cfg.images (as a user turn of the chat template with cfg.chat_template,
    else as vision start, image, vision end per image, then the text), processed by the model
    directory's VisionProcessor: (token ids with each image's placeholders, their ImageInputs)."""
    from ..data.vision_processor import IMAGE_TOKEN, VISION_START, VisionProcessor
    from ..data.vision_rows import open_image
    from ..model.hf_io import load_config
    if cfg.tensor_parallel != 1:
        raise errors.UsageError("--image with --tensor-parallel: not supported; generate images "
                                "on one device")
    try:
        processor = VisionProcessor.from_pretrained(cfg.model)
        spec = load_config(cfg.model).vision
        if spec is not None:
            processor.check_model(spec, f"--model {cfg.model}")
        pictures = [open_image(path, None, i) for i, path in enumerate(cfg.images)]
    except ValueError as e:
        raise errors.UsageError(f"--image: {e}") from None
    texts = [processor.render([{"role": "user", "content": [{"type": "image"}] * len(pictures)
                                + [{"type": "text", "text": p}]}], True)
             if cfg.chat_template else
             (VISION_START + IMAGE_TOKEN + "<|vision_end|>") * len(pictures) + p for p in prompts]
    encoded = [processor.encode(text, pictures) for text in texts]
    return [ids for ids, _ in encoded], [pixels for _, pixels in encoded]


def run_generate(args) -> int:
    """Complete the prompts of the config the command line gives; print them (text or JSON
    lines)."""
    cfg = config_io.command_config(GenerateConfig, args.config,
                                   [*_alias_overrides(args), *args.overrides])
    if args.print_config:
        return config_io.print_config(cfg)
    if not cfg.model:
        raise errors.UsageError(
            "give --model DIR (the option model): a Hugging Face model directory")
    prompts = _prompts(cfg)
    parse_memory(None if cfg.kv_cache_memory is None else f"{cfg.kv_cache_memory:g}")
    # The arguments and the path first: torch-free, so a mistake is answered at once.
    path_checks.check_model_path(cfg.model, "--model")
    path_checks.check_tokenizer_files(cfg.model, "--model")
    from ..inference.sampling_params import SamplingParams
    try:
        params = SamplingParams(n=cfg.n, temperature=cfg.temperature, top_k=cfg.top_k,
                                top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    except ValueError as e:
        raise _as_option(e) from e
    from ..inference.llm import LLM
    from ..train.run_setup import check_model_dir, resolve_device
    check_model_dir(cfg.model, "--model")
    device = resolve_device(cfg.device, "--device")
    given, images = prompts, None
    if cfg.images:  # token ids with each image's placeholders, and the images' pixels
        prompts, images = _with_images(cfg, prompts)
    else:
        prompts = _templated(cfg, prompts)  # what the model reads
    # an argument the engine rejects; the model's own problems are FusedRLErrors and pass through
    try:
        if cfg.tensor_parallel != 1:
            outputs = _generate_tensor_parallel(cfg, prompts, params, device)
            if outputs is None:  # not the first rank: it printed nothing
                return 0
        else:
            llm = LLM(cfg.model, dtype=cfg.dtype, kv_cache_memory=cfg.kv_budget(),
                      block_size=cfg.block_size, device=device,
                      speculative_tokens=cfg.speculative_tokens,
                      speculate_below=cfg.speculate_below)
            outputs = llm.generate(prompts, params, use_tqdm=cfg.progress, images=images)
            if cfg.speculative_tokens:
                tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
                print(f"speculative decoding: {llm.runner.forwards} model forwards for {tokens} "
                      "generated tokens", file=sys.stderr)
    except errors.FusedRLError:
        raise
    except ValueError as e:
        raise _as_option(e) from e
    for i, (prompt, out) in enumerate(zip(given, outputs)):
        for j, c in enumerate(out.outputs):
            if cfg.json:
                print(json.dumps({"prompt_index": i, "sample": j, "prompt": prompt, "text": c.text,
                                  "token_ids": c.token_ids, "logprobs": c.logprobs,
                                  "finish_reason": c.finish_reason}))
            else:
                shown = prompt if isinstance(prompt, str) else json.dumps(prompt)  # a message list
                print(f"[{i}.{j}] {shown}{c.text}  ({c.finish_reason}, {len(c.token_ids)} tokens)")
    sys.stdout.flush()
    return 0
