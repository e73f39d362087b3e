"""Exact on-policy mode: what it costs and whether it holds, side by side in one run.

One model (Qwen2.5-0.5B shape, random init, bf16 on a GPU), two engines over the SAME weights: the
default mode and `batch_invariant=True`. For each batch size: decode tokens/s of each (sampled at
temperature 1, fixed length, CUDA graphs on both) and their ratio; then the trainer's old-log-prob
forward (`response_logprobs`, the PPO code path) of what each sampled, its time, and the sampler vs
trainer log-prob gap: max and mean |difference| and the count of tokens that differ at all, which
the mode must bring to exactly 0. `--quick` runs a tiny fp32 model on the CPU to check the script.

    python bench/bench_exact.py                    # GPU: batch 1 and 128, 128 prompt + 256 new tokens
    python bench/bench_exact.py --quick            # CPU smoke run
"""
from __future__ import annotations

import time

import torch

from fusedrl.bench import harness
from fusedrl.bench.bench_generate import build_model_dir, time_ours
from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.stages.rollout.packs import pack_rollout
from fusedrl.engine.stages.ppo.forwards import response_logprobs


def parse_args():
    return harness.generation_args(harness.generation_parser(__doc__.splitlines()[0]), "exact",
                                   quick=dict(batch_sizes=[1, 4], prompt_len=16, new_tokens=8),
                                   full=dict(batch_sizes=[1, 128], prompt_len=128, new_tokens=256))


def trainer_gap(llm: LLM, outputs, temperature: float, exact: bool) -> dict:
    """Time the trainer's old-log-prob forward of the sampled rows and compare it to the sampler's."""
    prompts = [o.prompt_token_ids for o in outputs for _ in o.outputs]
    responses = [c.token_ids for o in outputs for c in o.outputs]
    sampler = torch.tensor([lp for o in outputs for c in o.outputs for lp in c.logprobs], dtype=torch.float32)
    device = next(llm.model.parameters()).device
    packed = pack_rollout(prompts, responses, device)
    invariant = llm.batch_invariant if exact else None
    with torch.no_grad():
        response_logprobs(llm.model, packed, temperature, invariant=invariant)  # warm-up (compiles kernels)
        harness.synchronize(device)
        start = time.perf_counter()
        logp, _, _ = response_logprobs(llm.model, packed, temperature, invariant=invariant)
        harness.synchronize(device)
        seconds = time.perf_counter() - start
    trained = torch.cat([row[:len(r)] for row, r in zip(logp.float().cpu(), responses)])
    diff = (sampler - trained).abs()
    return dict(forward_s=seconds, forward_tokens=int(packed.input_ids.shape[0]), mismatch_max=float(diff.max()),
                mismatch_mean=float(diff.mean()), mismatch_tokens=int((diff != 0).sum()), tokens=int(diff.numel()))


def main():
    args = parse_args()
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    path, _ = build_model_dir(args, device, dtype)
    model = load_model(path, dtype=dtype, device=str(device))
    kv_memory = 0.25 if device.type == "cuda" else 64 << 20
    engines = {name: LLM(model, kv_cache_memory=kv_memory, max_num_seqs=max(args.batch_sizes), batch_invariant=exact)
               for name, exact in (("default", False), ("exact", True))}
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, ignore_eos=True, seed=0)
    for llm in engines.values():  # warm-up: Triton compilation stays out of the timings
        llm.generate(torch.randint(0, vocab, (2, args.prompt_len), generator=g).tolist(),
                     SamplingParams(temperature=1.0, max_new_tokens=4, ignore_eos=True, seed=0))
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=g).tolist()
        row = dict(batch=batch)
        for name, llm in engines.items():
            _, decode_s, decode_tokens, outputs = time_ours(llm, prompts, params)
            row[f"{name}_decode_tok_s"] = decode_tokens / decode_s
            gap = trainer_gap(llm, outputs, params.temperature, exact=name == "exact")
            row.update({f"{name}_{key}": value for key, value in gap.items()})
        row["decode_ratio"] = row["exact_decode_tok_s"] / row["default_decode_tok_s"]
        row["forward_ratio"] = row["default_forward_s"] / row["exact_forward_s"]
        rows.append(row)
    print(harness.format_table(rows, COLUMNS))
    result = dict(meta=harness.run_metadata(device), dtype=str(dtype),
                  model="tiny" if args.quick else "Qwen2.5-0.5B shape (random init)", prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens, temperature=params.temperature,
                  segment=engines["exact"].batch_invariant.segment, block_size=engines["exact"].batch_invariant.chunk_size,
                  rows=rows)
    harness.write_json(args.out, result)
    print(f"wrote {args.out}")


COLUMNS = [("batch", "batch"), ("default_decode_tok_s", "default tok/s"), ("exact_decode_tok_s", "exact tok/s"),
           ("decode_ratio", "exact/default"), ("default_forward_s", "default fwd s"), ("exact_forward_s", "exact fwd s"),
           ("default_mismatch_max", "default gap max"), ("default_mismatch_tokens", "default tokens differing"),
           ("exact_mismatch_max", "exact gap max"), ("exact_mismatch_tokens", "exact tokens differing")]


if __name__ == "__main__":
    main()
