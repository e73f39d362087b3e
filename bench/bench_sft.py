"""SFT step throughput and peak memory: our trainer step vs the same step in plain transformers.

Both sides start from the same random-init model (Qwen2.5-0.5B shape), AdamW, gradient clipping at
1.0; on the GPU ours trains in bf16-mixed (bf16 weights, fp32 master weights and moments in the
optimizer, no autocast) and transformers in its usual fp32 weights with bf16 autocast; and the same B sequences of T tokens whose
first half is a masked prompt. Ours: packed varlen forward + `linear_token_logprobs` on the response
rows only (the [N, V] logits never exist). Transformers: `model(input_ids, labels=...)`, which
materializes [B, T, V] logits and their fp32 copy. Reports tokens/s of a full optimizer step
(forward, backward, clip, AdamW), the speedup, and the peak memory above the model + optimizer state.
Ours runs the step as one forward (data.tokens_per_microbatch = the step's tokens) and, for the
`per-row` column, as one forward per sequence (row-count micro-batches): the same gradient, so the
ratio is what packing to a token budget buys. On a GPU the `graphs` column is the packed step with
train.cuda_graphs (engine/train/captured_forwards.py: the forward replayed from a CUDA graph, its
capture in the warm-up step), where train.cuda_graphs could run (captured_forwards.blocker: not
with gradient checkpointing, nor where packed attention has no varlen kernel; "-" then).
`--quick` runs a tiny fp32 model on the CPU to check the script itself.

    python bench/bench_sft.py                    # GPU: batches 4x1024 and 8x2048
    python bench/bench_sft.py --quick            # CPU smoke run
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext
import json
from pathlib import Path

import torch
import transformers

from fusedrl.bench import harness
from fusedrl.bench.shapes import QWEN25_05B, TINY, model_dir as checkpoint_dir
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.train.optim import build_optimizer, build_scheduler
from fusedrl.engine.stages.sft import SFT_CAPTURED, sft_stage
from fusedrl.engine.train.captured_forwards import CapturedForwards, blocker
from fusedrl.engine.data.tokenization import TokenizedExample
from fusedrl.engine.config.train import DataConfig, OptimConfig, SFTConfig, TrainConfig
from fusedrl.engine.train.precision import param_dtype, resolve_precision
from fusedrl.engine.train.supervised import step_forwards, train_step

COLUMNS = [("shape", "batch"), ("ours_tok_s", "ours tok/s"), ("ours_graphs_tok_s", "graphs tok/s"),
           ("ours_per_row_tok_s", "per-row tok/s"),
           ("hf_tok_s", "hf tok/s"), ("speedup", "speedup"),
           ("ours_peak_gib", "ours peak GiB"), ("hf_peak_gib", "hf peak GiB"), ("memory_ratio", "hf/ours mem")]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny fp32 model on the CPU")
    p.add_argument("--shapes", nargs="+", help="BxT batches, e.g. 4x1024 8x2048")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers on both sides")
    p.add_argument("--skip-hf", action="store_true", help="only our trainer step")
    p.add_argument("--out", default=None, help="JSON results path (default: bench/results/sft[_quick].json)")
    args = p.parse_args()
    args.shapes = [tuple(map(int, s.split("x"))) for s in (args.shapes or (["2x32", "4x64"] if args.quick
                                                                          else ["4x1024", "8x2048"]))]
    if args.out is None:
        args.out = str(Path(__file__).resolve().parent / "results" / ("sft_quick.json" if args.quick else "sft.json"))
    return args


def make_batch(b: int, t: int, vocab: int):
    """B sequences of T random tokens; the first half of each is the (masked) prompt."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab, (b, t), generator=g)
    return [TokenizedExample(row[: t // 2].tolist(), (row[t // 2:].tolist(),)) for row in ids]


def bench_ours(model_dir: Path, examples, device, checkpointing: bool) -> dict:
    # A config only for train_step's optimizer settings: no data or output is touched.
    cfg = SFTConfig(model=str(model_dir), output_dir="-", data=DataConfig(train_file="-"),
                    train=TrainConfig(gradient_checkpointing=checkpointing))
    dtype = param_dtype(resolve_precision(cfg.train.precision, device))
    model = load_model(model_dir, dtype=dtype, device=device)
    model.train()
    model.gradient_checkpointing = checkpointing
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 10**6)
    stage = sft_stage(str(dtype).removeprefix("torch."), device)
    tokens = sum(ex.num_tokens for ex in examples)
    packed = step_forwards(stage, [examples], tokens)
    variants = [("", packed, None), ("per_row_", step_forwards(stage, [[ex] for ex in examples], None), None)]
    if blocker(model, device, SFT_CAPTURED, checkpointing, None) is None:
        variants.append(("graphs_", packed, CapturedForwards(model, SFT_CAPTURED, tokens)))
    results = {}
    for prefix, forwards, captured in variants:
        step = lambda: train_step(model, stage, forwards, optimizer, scheduler, cfg, device,  # noqa: E731
                                  captured=captured)
        results.update({prefix + k: v for k, v in _measure(step, device, tokens).items()})
    return results


def bench_hf(model_dir: Path, examples, device, checkpointing: bool) -> dict:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="sdpa").to(device)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    # What a transformers Trainer runs: torch's AdamW (fused on CUDA) and clip_grad_norm_.
    cfg = OptimConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    ids = torch.tensor([e.prompt + e.responses[0] for e in examples], device=device)   # [B, T]
    labels = ids.clone()
    labels[:, : len(examples[0].prompt)] = -100  # transformers shifts labels itself

    def step():
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        with autocast:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return _measure(step, device, ids.numel())


def _measure(step, device, tokens: int) -> dict:
    step()  # warm-up: allocates the optimizer state, so the peak below is the step's own
    ms = harness.time_ms(step, device, min_reps=3, budget_s=5.0)
    peak = harness.peak_extra_bytes(step, device)
    return {"tok_s": tokens / (ms * 1e-3), "ms": ms, "peak_gib": None if peak is None else peak / 2**30}


def main():
    args = parse_args()
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    model_dir = checkpoint_dir("qwen2.5-0.5b", args.quick, 0).path
    vocab = (TINY if args.quick else QWEN25_05B)["vocab_size"]
    rows = []
    for b, t in args.shapes:
        examples = make_batch(b, t, vocab)
        ours = bench_ours(model_dir, examples, device, args.gradient_checkpointing)
        row = {"shape": f"{b}x{t}", "ours_tok_s": ours["tok_s"], "ours_ms": ours["ms"], "ours_peak_gib": ours["peak_gib"],
               "ours_per_row_tok_s": ours["per_row_tok_s"], "ours_per_row_ms": ours["per_row_ms"],
               "ours_graphs_tok_s": ours.get("graphs_tok_s"), "ours_graphs_ms": ours.get("graphs_ms")}
        if not args.skip_hf:
            hf = bench_hf(model_dir, examples, device, args.gradient_checkpointing)
            row.update(hf_tok_s=hf["tok_s"], hf_ms=hf["ms"], hf_peak_gib=hf["peak_gib"],
                       speedup=ours["tok_s"] / hf["tok_s"],
                       memory_ratio=hf["peak_gib"] / ours["peak_gib"] if hf["peak_gib"] else None)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(harness.format_table(rows, COLUMNS))
    payload = {"meta": harness.run_metadata(device), "quick": args.quick,
               "gradient_checkpointing": args.gradient_checkpointing, "rows": rows}
    harness.write_json(args.out, payload)
    print(json.dumps({"written": args.out}))


if __name__ == "__main__":
    main()
