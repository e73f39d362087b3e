"""`fusedrl generate`: complete prompts from the command line.

engine/cli.py registers it with `generate_cli.add_parser(subparsers)`; the parsed namespace carries
`run=run`, which cli.main calls. Completions go to stdout (text, or one JSON object per completion with --json); the
progress bar goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate completions with the paged-KV engine",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=None, help="makes the completions reproducible")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--kv-cache-memory", type=_memory, default=None,
                   help="KV pool: bytes (e.g. 2000000000) or a fraction of free GPU memory (e.g. 0.5)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print one JSON object per completion")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=run)  # engine/cli.py dispatches through args.run(args)
    return p


def _memory(text: str) -> int | float:
    """'0.5' -> a fraction of free GPU memory (values <= 1); '2e9' or '2000000000' -> bytes."""
    value = float(text)
    return value if value <= 1 else int(value)


def run(args) -> int:
    from engine import LLM, SamplingParams  # deferred: `fusedrl --help` should not import torch

    prompts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise SystemExit("fusedrl generate: give --prompt TEXT (repeatable) or --prompt-file FILE")
    params = SamplingParams(n=args.n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
              block_size=args.block_size, device=args.device)
    outputs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        for j, c in enumerate(out.outputs):
            if args.json:
                print(json.dumps({"prompt_index": i, "sample": j, "prompt": prompt, "text": c.text,
                                  "token_ids": c.token_ids, "logprobs": c.logprobs,
                                  "finish_reason": c.finish_reason}))
            else:
                print(f"[{i}.{j}] {prompt}{c.text}  ({c.finish_reason}, {len(c.token_ids)} tokens)")
    sys.stdout.flush()
    return 0
