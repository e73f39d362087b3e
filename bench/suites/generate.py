"""The generate suite, with bench_generate.py's measuring code: greedy decode at batch 1 (ours and
transformers' `generate` on the same checkpoint), then the mixed workload (ours: requests whose
prompt and output lengths are uniform in [100, 1024], all submitted at once, temperature 0.6), every
output exactly its length (end-of-sequence ignored).

fraction_of_limit is the decode tokens/s over the decode roofline: a step reads every weight once
and each sequence's KV at the device's bandwidth. For the mixed workload the roofline is taken at
the batch the engine holds (every request, up to max_num_seqs) and the mean context (mean prompt +
half the mean output), and the output tokens/s include the prefills: a bound, not a target.
"""
from __future__ import annotations

import types

import torch

from .. import bench_generate, results, shapes
from ..context import Context, peer_version

SUITE = "generate"
# (prompt tokens, new tokens) at batch 1; the mixed workload's requests and length range.
FULL = dict(prompt_len=128, new_tokens=512, mixed=256, mixed_lengths=[100, 1024])
QUICK = dict(prompt_len=16, new_tokens=32, mixed=16, mixed_lengths=[8, 64])


def rows(ctx: Context) -> list[dict]:
    from fusedrl.engine.inference.llm import LLM
    from fusedrl.engine.inference.runner import kv_bytes_per_block
    from fusedrl.engine.inference.sampling_params import SamplingParams

    shape = types.SimpleNamespace(**(QUICK if ctx.quick else FULL))
    single = f"batch 1, prompt {shape.prompt_len}, {shape.new_tokens} new"
    low, high = shape.mixed_lengths
    mixed = f"mixed: {shape.mixed} requests, lengths uniform in [{low}, {high}]"
    if not (ctx.wanted(single) or ctx.wanted(mixed)):
        return []
    device, dtype = ctx.device, ctx.dtype
    model = shapes.model_dir(ctx.options.model, ctx.quick, ctx.options.seed, dtype)
    out = []
    try:
        llm = LLM(model.path, dtype=dtype, device=str(device), max_num_seqs=min(shape.mixed, 256),
                  kv_cache_memory=0.5 if device.type == "cuda" else 256 << 20)
        weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
        kv_per_token = kv_bytes_per_block(llm.config, dtype, 1)
        g = torch.Generator().manual_seed(ctx.options.seed)
        vocab = llm.config.vocab_size
        # Warm-up: Triton compilation and allocator growth stay out of the timings.
        llm.generate(torch.randint(0, vocab, (2, shape.prompt_len), generator=g).tolist(),
                     SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
        if ctx.wanted(single):
            prompts = torch.randint(0, vocab, (1, shape.prompt_len), generator=g).tolist()
            out += single_rows(ctx, llm, model, prompts, shape.new_tokens, weight_bytes,
                               kv_per_token, f"{single} ({model.label})")
        if ctx.wanted(mixed):
            out.append(mixed_row(ctx, llm, shape, weight_bytes, kv_per_token,
                                 f"{mixed} ({model.label})"))
    finally:
        model.remove()
    return out


def single_rows(ctx: Context, llm, model, prompts, new_tokens: int, weight_bytes: int,
                kv_per_token: int, name: str) -> list[dict]:
    """Ours and transformers' at batch 1, against the same roofline."""
    from fusedrl.engine.inference.sampling_params import SamplingParams
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    roofline = bench_generate.decode_roofline_tok_s(
        1, len(prompts[0]) + new_tokens / 2, weight_bytes, kv_per_token, ctx.limits.bytes_per_s)
    limit = f"decode roofline, {ctx.limits.label}"
    total, decode_s, decode_tokens, _ = bench_generate.time_ours(llm, prompts, params)
    ours = results.make_row(
        SUITE, name, "fusedrl", fraction_of_limit=decode_tokens / decode_s / roofline,
        limit=limit, seconds=total, tok_s=new_tokens / total,
        decode_tok_s=decode_tokens / decode_s, roofline_tok_s=roofline, weight_bytes=weight_bytes)
    return [ours, hf_row(ctx, model, prompts, new_tokens, name, limit, roofline)]


def hf_row(ctx: Context, model, prompts, new_tokens: int, name: str, limit: str,
           roofline: float) -> dict:
    """transformers' `generate` on the same checkpoint and prompt (SDPA, greedy, no stop)."""
    import transformers
    impl = f"transformers {peer_version('transformers')}"
    hf = transformers.AutoModelForCausalLM.from_pretrained(model.path, dtype=ctx.dtype,
                                                           attn_implementation="sdpa")
    hf = hf.to(ctx.device).eval()
    bench_generate.time_hf(hf, prompts, 4, ctx.device)  # warm-up
    seconds = bench_generate.time_hf(hf, prompts, new_tokens, ctx.device)
    return results.make_row(SUITE, name, impl, fraction_of_limit=new_tokens / seconds / roofline,
                            limit=limit, seconds=seconds, tok_s=new_tokens / seconds,
                            roofline_tok_s=roofline)


def mixed_row(ctx: Context, llm, shape, weight_bytes: int, kv_per_token: int, name: str) -> dict:
    mixed = bench_generate.time_mixed(llm, shape, ctx.device)
    batch = min(shape.mixed, llm.scheduler.max_num_seqs)
    mean_context = (mixed["prompt_tokens"] + mixed["output_tokens"] / 2) / mixed["requests"]
    roofline = bench_generate.decode_roofline_tok_s(batch, mean_context, weight_bytes,
                                                    kv_per_token, ctx.limits.bytes_per_s)
    return results.make_row(
        SUITE, name, "fusedrl", fraction_of_limit=mixed["output_tok_s"] / roofline,
        limit=f"decode roofline at batch {batch}, {ctx.limits.label}", seconds=mixed["seconds"],
        tok_s=mixed["output_tok_s"], output_tokens=mixed["output_tokens"],
        prompt_tokens=mixed["prompt_tokens"], preemptions=mixed["preemptions"],
        roofline_tok_s=roofline)
